//! SIP signalling: sans-IO message handling, transactions, dialogs and SDP, plus thin tokio transports.

pub mod dialog;
pub mod framing;
pub mod message;
pub mod parse;
pub mod sdp;
pub mod timer;
pub mod transaction;
pub mod transport;
pub mod ua;
