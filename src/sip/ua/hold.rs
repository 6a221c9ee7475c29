//! Re-offering an established call's media with another direction: how a B2BUA passes one
//! leg's hold (RFC 3264 §8.4: a re-offer marked `sendonly` or `inactive`) to the other leg,
//! and takes it back with `sendrecv`.

use super::*;

impl UserAgent {
    /// Sends a re-INVITE offering our current media with `direction` on the audio stream.
    /// The peer's 2xx is ACKed like a session refresh's; a 408/481 ends the call.
    pub fn reoffer_direction(
        &mut self,
        handle: CallHandle,
        direction: sdp::Direction,
        now: Instant,
    ) -> Result<(), UaError> {
        self.set_now(now);
        let call = self.calls.get_mut(&handle).ok_or(UaError::UnknownCall)?;
        if call.state != CallState::Confirmed || call.awaiting_ack.is_some() {
            return Err(UaError::WrongState(call.state.name()));
        }
        let Some(mut sdp) = call.local_sdp.clone() else {
            return Err(UaError::WrongState(call.state.name()));
        };
        sdp.session_version += 1;
        sdp.direction = None;
        for m in sdp
            .media
            .iter_mut()
            .filter(|m| m.kind == "audio" && m.port != 0)
        {
            m.direction = Some(direction);
        }
        let body = sdp.to_bytes();
        call.local_sdp = Some(sdp);
        self.send_in_dialog(
            handle,
            rsip::Method::Invite,
            Some(("application/sdp", body)),
            ClientPurpose::Refresh,
            now,
        );
        self.announce_timer();
        Ok(())
    }
}
