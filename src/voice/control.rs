//! Who receives each call's SIP events, and the live-call list the HTTP API shows.
//!
//! The SIP dispatcher owns the map from call handle to the task that runs the call. Outbound
//! legs are placed *through* the dispatcher ([`CallControl::place`]) so the handle is
//! registered before the dispatcher reads the leg's first response: no event can slip past.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::call::CallEvent;
use crate::sip::{ua::OutboundCall, CallHandle, TransportError};

/// An event for one of a task's calls: its own leg or a leg it placed.
/// Boxed: a channel allocates its slots 32 at a time, and every call holds one such channel.
pub type LegEvent = Box<(CallHandle, CallEvent)>;

/// What the dispatcher is asked to do besides routing SIP events.
#[derive(Debug)]
pub enum DispatchCommand {
    /// Send an INVITE and deliver the new call's events to `events`.
    Place {
        call: Box<OutboundCall>,
        events: mpsc::UnboundedSender<LegEvent>,
        reply: oneshot::Sender<Result<CallHandle, TransportError>>,
    },
    /// Deliver an event to whichever task owns `call` (the API hanging a call up).
    Deliver { call: CallHandle, event: CallEvent },
}

/// Cheap handle to the dispatcher's command queue.
#[derive(Clone, Debug)]
pub struct CallControl {
    commands: mpsc::UnboundedSender<DispatchCommand>,
    pub live: LiveCalls,
}

impl CallControl {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<DispatchCommand>) {
        let (commands, rx) = mpsc::unbounded_channel();
        (
            CallControl {
                commands,
                live: LiveCalls::default(),
            },
            rx,
        )
    }

    /// Place an outbound call whose events go to `events`.
    pub async fn place(
        &self,
        call: OutboundCall,
        events: mpsc::UnboundedSender<LegEvent>,
    ) -> Result<CallHandle, TransportError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(DispatchCommand::Place {
                call: Box::new(call),
                events,
                reply,
            })
            .map_err(|_| TransportError::Stopped)?;
        rx.await.map_err(|_| TransportError::Stopped)?
    }

    /// Ask the task running `call` to hang it up; false when no such live call.
    pub fn hang_up(&self, id: u64, cause: &str) -> bool {
        if !self.live.contains(id) {
            return false;
        }
        self.commands
            .send(DispatchCommand::Deliver {
                call: CallHandle(id),
                event: CallEvent::Kill {
                    cause: cause.to_string(),
                },
            })
            .is_ok()
    }
}

/// One live call as the API lists it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LiveCall {
    pub id: u64,
    /// `inbound` (a caller reached a route) or `outbound` (originated).
    pub direction: &'static str,
    pub from: String,
    pub to: String,
    pub script: Option<String>,
    /// `ringing`, `calling`, `answered`, `bridging`, `bridged`.
    pub state: &'static str,
    pub started_at_ms: i64,
    pub answered_at_ms: Option<i64>,
    /// The outbound leg's id while bridged.
    pub bridged_to: Option<u64>,
    /// Seconds since the call started (filled in when listed).
    pub duration_s: f64,
}

/// Every call a task is running, by id (the call handle's number).
#[derive(Debug, Clone, Default)]
pub struct LiveCalls(Arc<Mutex<BTreeMap<u64, LiveCall>>>);

impl LiveCalls {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, LiveCall>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, call: LiveCall) {
        self.lock().insert(call.id, call);
    }

    pub fn update(&self, id: u64, f: impl FnOnce(&mut LiveCall)) {
        if let Some(c) = self.lock().get_mut(&id) {
            f(c);
        }
    }

    pub fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    pub fn contains(&self, id: u64) -> bool {
        self.lock().contains_key(&id)
    }

    pub fn get(&self, id: u64, now_ms: i64) -> Option<LiveCall> {
        self.lock().get(&id).cloned().map(|mut c| {
            c.duration_s = (now_ms - c.started_at_ms).max(0) as f64 / 1000.0;
            c
        })
    }

    pub fn list(&self, now_ms: i64) -> Vec<LiveCall> {
        self.lock()
            .values()
            .cloned()
            .map(|mut c| {
                c.duration_s = (now_ms - c.started_at_ms).max(0) as f64 / 1000.0;
                c
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
