//! callforge: a ScriptForge-compatible engine for programmable voice, routing and scripts.

pub mod app;
pub mod config;
pub mod http;
pub mod lag;
pub mod lifecycle;
pub mod logging;
pub mod media;
pub mod memory;
pub mod metrics;
pub mod modules;
pub mod routing;
pub mod script;
pub mod sip;
pub mod store;
pub mod udp;
pub mod voice;
