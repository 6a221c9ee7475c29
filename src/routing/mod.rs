//! Class 4 over SIP: the route table, and the redirect server (INVITE → script → 302/4xx/6xx).
//!
//! | module | job |
//! |---|---|
//! | [`table`] | `[[route]]` entries compiled: Request-URI user → script, mode, vars |
//! | [`request`] | `data.routing` built from an INVITE |
//! | [`gateways`] | the `[gateways]` table, replaced whole on reload |
//! | [`redirect`] | a normalised class4 result → 302 Contacts (pure, unit-tested) |
//! | [`fast`] | `[sip] fast_path`: class4 INVITEs received, run and answered on the script worker |
//! | [`server`] | one INVITE end to end: run the script, answer over the [`SipHandle`](crate::sip::SipHandle) |

pub mod fast;
pub mod gateways;
pub mod redirect;
pub mod request;
pub mod server;
pub mod table;

pub use gateways::Gateways;
pub use redirect::{contacts, Decision, RedirectError};
pub use server::Class4Server;
pub use table::{Route, RouteError, RouteTable};
