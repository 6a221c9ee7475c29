//! Hold while bridged: a re-offer from one leg changes what the relay sends to that leg
//! (nothing while its SDP says it does not receive) and is passed to the other leg as a
//! re-INVITE with the same direction, so both phones agree who is on hold; `sendrecv` takes
//! it back the same way.

use super::call::CallState;
use crate::sip::Negotiated;

/// Whether we may send to a leg after negotiating `neg` with it.
fn sends_to(neg: &Negotiated) -> bool {
    neg.local_direction.sends() && neg.remote_rtp.is_some()
}

impl CallState {
    /// True while a relay carries the caller's media.
    pub(super) fn relaying(&self) -> bool {
        self.bridge.as_ref().is_some_and(|b| b.relay.is_some())
    }

    /// The caller re-offered (hold or resume) while bridged.
    pub(super) async fn caller_reoffered(&mut self, neg: Negotiated) {
        let Some(b) = self.bridge.as_ref() else {
            return;
        };
        let Some(run) = b.relay.as_ref() else {
            return;
        };
        let open = sends_to(&neg);
        run.gates.send_modify(|g| g.to_a = open);
        let leg = b.leg;
        let direction = neg.offered_direction;
        tracing::info!(call = ?self.call, leg = leg.0, ?direction, "caller re-offered while bridged; passing it on");
        self.negotiated = Some(neg);
        if let Err(e) = self.server.sip.reoffer(leg, direction).await {
            tracing::info!(call = ?self.call, leg = leg.0, "hold not passed to the callee: {e}");
        }
    }

    /// The callee re-offered (hold or resume) while bridged.
    pub(super) async fn callee_reoffered(&mut self, neg: Negotiated) {
        let Some(b) = self.bridge.as_mut() else {
            return;
        };
        let Some(run) = b.relay.as_ref() else {
            return;
        };
        let open = sends_to(&neg);
        run.gates.send_modify(|g| g.to_b = open);
        let direction = neg.offered_direction;
        tracing::info!(call = ?self.call, leg = b.leg.0, ?direction, "callee re-offered while bridged; passing it on");
        b.b_neg = Some(neg);
        if let Err(e) = self.server.sip.reoffer(self.call, direction).await {
            tracing::info!(call = ?self.call, "hold not passed to the caller: {e}");
        }
    }
}
