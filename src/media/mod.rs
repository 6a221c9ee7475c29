//! Media: sans-IO RTP sessions, G.711, DTMF and prompt audio, plus a thin tokio RTP socket driver.

pub mod dtmf;
pub mod g711;
pub mod goertzel;
pub mod jitter;
pub mod paths;
pub mod player;
pub mod prompt;
pub mod recorder;
pub mod rtp;
pub mod rtp_socket;
pub mod session;
pub mod tone;
