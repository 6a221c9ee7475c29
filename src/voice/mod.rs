//! Class 5 voice: one task per call, holding the dialog, the RTP session and the script's `ctx`.

pub mod collect;
pub mod media_bind;
pub mod media_ops;
pub mod media_task;
