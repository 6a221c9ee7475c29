//! Hold while bridged: a re-offer from one leg changes what the relay sends to that leg
//! (nothing while its SDP says it does not receive) and is passed to the other leg as a
//! re-INVITE with the same direction, so both phones agree who is on hold; `sendrecv` takes
//! it back the same way. A re-offer that keeps the direction (a session refresh) is not
//! passed on.

use super::call::CallState;
use crate::{media::relay_driver::RelayGates, sip::Negotiated};

/// Whether we may send to a leg after negotiating `neg` with it.
fn sends_to(neg: &Negotiated) -> bool {
    neg.local_direction.sends() && neg.remote_rtp.is_some()
}

/// Whether what a leg sends is to be taken (and relayed) after negotiating `neg` with it.
fn takes_from(neg: &Negotiated) -> bool {
    neg.local_direction.receives()
}

/// What the relay lets through for the two legs' current negotiations: toward a leg only
/// when we may send to it and may take what the other leg sends.
fn gates(caller: &Negotiated, callee: &Negotiated) -> RelayGates {
    RelayGates {
        to_a: sends_to(caller) && takes_from(callee),
        to_b: sends_to(callee) && takes_from(caller),
    }
}

impl CallState {
    /// True while a relay carries the caller's media.
    pub(super) fn relaying(&self) -> bool {
        self.bridge.as_ref().is_some_and(|b| b.relay.is_some())
    }

    /// Sets the relay's gates from both legs' current negotiations.
    pub(super) fn apply_gates(&self) {
        let (Some(caller), Some(b)) = (&self.negotiated, &self.bridge) else {
            return;
        };
        let (Some(callee), Some(run)) = (&b.b_neg, &b.relay) else {
            return;
        };
        let g = gates(caller, callee);
        tracing::debug!(call = ?self.call, ?g, "relay gates");
        run.gates.send_replace(g);
    }

    /// The caller re-offered (hold or resume) while bridged.
    pub(super) async fn caller_reoffered(&mut self, neg: Negotiated) {
        let Some(leg) = self.bridge.as_ref().map(|b| b.leg) else {
            return;
        };
        let direction = neg.offered_direction;
        // A session refresh repeats the direction: nothing to pass on then.
        let changed = self
            .negotiated
            .as_ref()
            .is_none_or(|n| n.offered_direction != direction);
        self.negotiated = Some(neg);
        self.apply_gates();
        if !changed {
            return;
        }
        tracing::info!(call = ?self.call, leg = leg.0, ?direction, "caller re-offered while bridged; passing it on");
        if let Err(e) = self.server.sip.reoffer(leg, direction).await {
            tracing::info!(call = ?self.call, leg = leg.0, "hold not passed to the callee: {e}");
        }
    }

    /// The callee re-offered (hold or resume) while bridged.
    pub(super) async fn callee_reoffered(&mut self, neg: Negotiated) {
        let Some(b) = self.bridge.as_mut() else {
            return;
        };
        let direction = neg.offered_direction;
        let changed = b
            .b_neg
            .as_ref()
            .is_none_or(|n| n.offered_direction != direction);
        let leg = b.leg;
        b.b_neg = Some(neg);
        self.apply_gates();
        if !changed {
            return;
        }
        tracing::info!(call = ?self.call, leg = leg.0, ?direction, "callee re-offered while bridged; passing it on");
        if let Err(e) = self.server.sip.reoffer(self.call, direction).await {
            tracing::info!(call = ?self.call, "hold not passed to the caller: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::sdp::{Codec, Direction};

    fn neg(offered: Direction) -> Negotiated {
        Negotiated {
            codec: Codec::Pcmu,
            payload_type: 0,
            dtmf_payload_type: None,
            remote_rtp: Some("192.0.2.1:4000".parse().unwrap()),
            remote_ptime: None,
            offered_direction: offered,
            local_direction: offered.answer(),
            media_index: 0,
        }
    }

    #[test]
    fn each_hold_closes_the_right_directions() {
        use Direction::*;
        let open = RelayGates {
            to_a: true,
            to_b: true,
        };
        assert_eq!(gates(&neg(SendRecv), &neg(SendRecv)), open);
        // The caller holds (sendonly): nothing to it; its music goes on to the callee.
        assert_eq!(
            gates(&neg(SendOnly), &neg(SendRecv)),
            RelayGates {
                to_a: false,
                to_b: true
            }
        );
        // The callee goes inactive: nothing either way.
        assert_eq!(
            gates(&neg(SendRecv), &neg(Inactive)),
            RelayGates {
                to_a: false,
                to_b: false
            }
        );
        // The caller only listens (recvonly): it is sent to, its packets are not relayed.
        assert_eq!(
            gates(&neg(RecvOnly), &neg(SendRecv)),
            RelayGates {
                to_a: true,
                to_b: false
            }
        );
        // A hold by c=0.0.0.0 (no address): nothing to that leg.
        let mut old_hold = neg(SendRecv);
        old_hold.remote_rtp = None;
        assert!(!gates(&neg(SendRecv), &old_hold).to_b);
    }
}
