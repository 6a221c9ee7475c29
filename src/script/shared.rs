//! Runtimes shared by many class5 calls, one fresh context per call.
//!
//! A class5 script lives as long as its call, so a thousand calls mean a thousand live
//! contexts. QuickJS serves small allocations from 4 KiB arenas per size class and per
//! runtime, so a runtime of its own costs a call about 100 KiB beyond what its objects use
//! (the runtime itself and its partly filled arenas). Sharing one runtime between up to
//! [`MAX_MEMBERS`] calls shares those arenas.
//!
//! What stays per call:
//! - the context: its own globals and built-ins, so nothing leaks between calls;
//! - the CPU budget and interrupt: the runtime's interrupt handler asks the run that is
//!   executing JavaScript at that moment (one worker thread runs one slice at a time);
//! - the memory limit: [`Ledger`] charges every block the runtime allocates to the run that
//!   was executing when it was allocated, refuses the allocation that would take that run
//!   past its limit (QuickJS then throws "out of memory" in that run only), and credits the
//!   owner when the block is freed, whoever frees it.
//!
//! The job queue is the runtime's, but every run drains it before it awaits, and a run's
//! leftover jobs are run (interrupted at once) when it ends, so each job runs in its own
//! call's slice. The exception would be `FinalizationRegistry` callbacks, queued by
//! whichever call's allocation ran the collector: class5 contexts do not have it.
//!
//! Bookkeeping is per block of the underlying allocator: QuickJS's arenas are 4 KiB blocks
//! carved into small objects, so a run is charged for the arenas its allocations opened.
//! Objects of other calls may later share such an arena; the error is at most a few arenas.

use std::{
    cell::{Cell, RefCell},
    rc::Rc,
};

use rquickjs::{allocator::Allocator, Runtime};

/// Calls one shared runtime hosts at most. Dead contexts are garbage until the runtime's next
/// collection ([`GC_EVERY`] deaths), so more members per runtime means less of it per live
/// call: 32 to 64 took the IVR load from 110 to 107 KiB per live call, for a collection
/// that walks twice as many objects (128 gave 105 KiB and half again as much user CPU).
pub(crate) const MAX_MEMBERS: usize = 64;
/// Contexts that may die in a shared runtime before it is collected: a collection walks
/// every live call's objects, so it is batched.
pub(crate) const GC_EVERY: usize = 8;

/// The run executing JavaScript in a shared runtime: what its interrupt handler asks.
pub(crate) trait Interruptible {
    fn should_interrupt(&self) -> bool;
}

struct Account {
    /// Bumped when the slot is reused, so blocks of a finished run are never credited to
    /// the next one.
    generation: u32,
    used: usize,
    limit: usize,
}

/// Per-run memory accounts of one shared runtime. Slot 0 is the runtime itself (contexts
/// being created or torn down, collections between runs): never limited.
pub(crate) struct Ledger {
    current: Cell<u32>,
    accounts: RefCell<Vec<Account>>,
    free: RefCell<Vec<u32>>,
}

impl Ledger {
    fn new() -> Self {
        Ledger {
            current: Cell::new(0),
            accounts: RefCell::new(vec![Account {
                generation: 0,
                used: 0,
                limit: usize::MAX,
            }]),
            free: RefCell::new(Vec::new()),
        }
    }

    /// A new account for a run allowed `limit` bytes.
    fn open(&self, limit: usize) -> u32 {
        let mut accounts = self.accounts.borrow_mut();
        match self.free.borrow_mut().pop() {
            Some(slot) => {
                let a = &mut accounts[slot as usize];
                a.used = 0;
                a.limit = limit;
                slot
            }
            None => {
                accounts.push(Account {
                    generation: 0,
                    used: 0,
                    limit,
                });
                (accounts.len() - 1) as u32
            }
        }
    }

    fn close(&self, slot: u32) {
        if slot == 0 {
            return;
        }
        let mut accounts = self.accounts.borrow_mut();
        let a = &mut accounts[slot as usize];
        a.generation = a.generation.wrapping_add(1);
        a.used = 0;
        self.free.borrow_mut().push(slot);
    }

    /// Bytes currently charged to `slot`.
    #[cfg(test)]
    fn used(&self, slot: u32) -> usize {
        self.accounts.borrow()[slot as usize].used
    }

    /// Whether `slot` holds more than half its limit.
    fn over_half(&self, slot: u32) -> bool {
        let accounts = self.accounts.borrow();
        accounts
            .get(slot as usize)
            .is_some_and(|a| a.used > a.limit / 2)
    }

    /// Charge `size` bytes to the current run; `None` when that exceeds its limit.
    fn charge(&self, size: usize) -> Option<Header> {
        let slot = self.current.get();
        let mut accounts = self.accounts.borrow_mut();
        let a = &mut accounts[slot as usize];
        if a.used.saturating_add(size) > a.limit {
            return None;
        }
        a.used += size;
        Some(Header {
            slot,
            generation: a.generation,
            size,
        })
    }

    fn credit(&self, h: &Header) {
        let mut accounts = self.accounts.borrow_mut();
        if let Some(a) = accounts.get_mut(h.slot as usize) {
            if a.generation == h.generation {
                a.used = a.used.saturating_sub(h.size);
            }
        }
    }
}

/// What precedes each block: its owner and size. 16 bytes keep blocks 16-byte aligned.
#[repr(C)]
#[derive(Clone, Copy)]
struct Header {
    slot: u32,
    generation: u32,
    size: usize,
}

const HEADER: usize = 16;
const _: () = assert!(std::mem::size_of::<Header>() == HEADER);

/// QuickJS's allocator for a shared runtime: libc's malloc plus the ledger.
struct LedgerAlloc(Rc<Ledger>);

impl LedgerAlloc {
    /// # Safety
    /// `base` is null or a fresh allocation of at least `HEADER + h.size` bytes.
    unsafe fn finish(base: *mut u8, h: Header, ledger: &Ledger) -> *mut u8 {
        if base.is_null() {
            ledger.credit(&h);
            return std::ptr::null_mut();
        }
        base.cast::<Header>().write(h);
        base.add(HEADER)
    }
}

// SAFETY: every block returned is HEADER bytes into a libc allocation (16-byte aligned),
// has room for the requested size, and is freed/resized through the same base pointer.
unsafe impl Allocator for LedgerAlloc {
    fn alloc(&mut self, size: usize) -> *mut u8 {
        let Some(h) = self.0.charge(size) else {
            return std::ptr::null_mut();
        };
        // SAFETY: plain libc allocation of HEADER + size bytes.
        unsafe { Self::finish(libc::malloc(HEADER + size).cast(), h, &self.0) }
    }

    fn calloc(&mut self, count: usize, size: usize) -> *mut u8 {
        let Some(total) = count.checked_mul(size) else {
            return std::ptr::null_mut();
        };
        let Some(h) = self.0.charge(total) else {
            return std::ptr::null_mut();
        };
        // SAFETY: as in alloc, zeroed.
        unsafe { Self::finish(libc::calloc(1, HEADER + total).cast(), h, &self.0) }
    }

    unsafe fn dealloc(&mut self, ptr: *mut u8) {
        let base = ptr.sub(HEADER);
        let h = base.cast::<Header>().read();
        self.0.credit(&h);
        libc::free(base.cast());
    }

    unsafe fn realloc(&mut self, ptr: *mut u8, new_size: usize) -> *mut u8 {
        if ptr.is_null() {
            return self.alloc(new_size);
        }
        let base = ptr.sub(HEADER);
        let old = base.cast::<Header>().read();
        // The block now belongs to whoever resizes it.
        self.0.credit(&old);
        let Some(h) = self.0.charge(new_size) else {
            // Refused: the old block stays valid and charged as before.
            let mut accounts = self.0.accounts.borrow_mut();
            if let Some(a) = accounts.get_mut(old.slot as usize) {
                if a.generation == old.generation {
                    a.used += old.size;
                }
            }
            return std::ptr::null_mut();
        };
        let grown = libc::realloc(base.cast(), HEADER + new_size).cast::<u8>();
        if grown.is_null() {
            self.0.credit(&h);
            let mut accounts = self.0.accounts.borrow_mut();
            if let Some(a) = accounts.get_mut(old.slot as usize) {
                if a.generation == old.generation {
                    a.used += old.size;
                }
            }
            return std::ptr::null_mut();
        }
        grown.cast::<Header>().write(h);
        grown.add(HEADER)
    }

    unsafe fn usable_size(ptr: *mut u8) -> usize {
        ptr.sub(HEADER).cast::<Header>().read().size
    }
}

/// A runtime hosting several calls' contexts.
pub(crate) struct SharedRuntime {
    pub(crate) rt: Runtime,
    pub(crate) ledger: Rc<Ledger>,
    current: Rc<RefCell<Option<Rc<dyn Interruptible>>>>,
    members: Cell<usize>,
    /// No new members: one of its runs hit a limit or panicked. Freed when empty.
    retired: Cell<bool>,
    dead_since_gc: Cell<usize>,
}

/// A run's place in a shared runtime.
pub(crate) struct Membership {
    pub(crate) runtime: Rc<SharedRuntime>,
    pub(crate) slot: u32,
}

/// While alive, the member's run is the one executing in its runtime.
pub(crate) struct Active<'a> {
    runtime: &'a SharedRuntime,
    previous: Option<Rc<dyn Interruptible>>,
    previous_slot: u32,
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        *self.runtime.current.borrow_mut() = self.previous.take();
        self.runtime.ledger.current.set(self.previous_slot);
    }
}

impl Membership {
    /// After a slice: a run holding over half its limit gets a collection now. The shared
    /// runtime's own GC threshold grows with every call in it, so without this a call that
    /// churns cyclic garbage could be refused memory that a collection would give back.
    pub(crate) fn collect_if_heavy(&self) {
        if self.runtime.ledger.over_half(self.slot) {
            self.runtime.rt.run_gc();
        }
    }

    /// Mark `run` as executing (interrupts and allocations are its own) until the guard drops.
    pub(crate) fn enter(&self, run: Rc<dyn Interruptible>) -> Active<'_> {
        let rt = &*self.runtime;
        let previous = rt.current.borrow_mut().replace(run);
        let previous_slot = rt.ledger.current.replace(self.slot);
        Active {
            runtime: rt,
            previous,
            previous_slot,
        }
    }
}

impl SharedRuntime {
    pub(crate) fn new(stack_bytes: usize, gc_threshold: usize) -> rquickjs::Result<Rc<Self>> {
        let ledger = Rc::new(Ledger::new());
        let rt = Runtime::new_with_alloc(LedgerAlloc(ledger.clone()))?;
        rt.set_max_stack_size(stack_bytes);
        rt.set_gc_threshold(gc_threshold);
        let current: Rc<RefCell<Option<Rc<dyn Interruptible>>>> = Rc::new(RefCell::new(None));
        let asked = current.clone();
        rt.set_interrupt_handler(Some(Box::new(move || {
            asked
                .borrow()
                .as_ref()
                .is_some_and(|run| run.should_interrupt())
        })));
        Ok(Rc::new(SharedRuntime {
            rt,
            ledger,
            current,
            members: Cell::new(0),
            retired: Cell::new(false),
            dead_since_gc: Cell::new(0),
        }))
    }

    pub(crate) fn has_room(&self) -> bool {
        !self.retired.get() && self.members.get() < MAX_MEMBERS
    }

    pub(crate) fn members(&self) -> usize {
        self.members.get()
    }

    pub(crate) fn is_retired(&self) -> bool {
        self.retired.get()
    }

    /// Admit a run allowed `memory_limit` bytes.
    pub(crate) fn join(self: &Rc<Self>, memory_limit: usize) -> Membership {
        self.members.set(self.members.get() + 1);
        Membership {
            runtime: self.clone(),
            slot: self.ledger.open(memory_limit),
        }
    }

    /// A member's context is gone; `healthy` is false when its run hit a limit or panicked.
    /// Collects when enough contexts died (or none is left).
    pub(crate) fn leave(&self, slot: u32, healthy: bool) {
        self.members.set(self.members.get().saturating_sub(1));
        if !healthy {
            self.retired.set(true);
        }
        let dead = self.dead_since_gc.get() + 1;
        if dead >= GC_EVERY || self.members.get() == 0 {
            self.rt.run_gc();
            self.dead_since_gc.set(0);
        } else {
            self.dead_since_gc.set(dead);
        }
        self.ledger.close(slot);
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use futures::FutureExt;
    use serde_json::{json, Value as Json};

    use crate::script::{
        compile, Engine, EngineConfig, HostCall, HostMethod, HostObject, Invocation, Limits, Mode,
        ScriptError,
    };

    /// `ctx.wait(ms)`: a host operation that keeps the call waiting, like a prompt.
    struct WaitCtx;

    impl HostObject for WaitCtx {
        fn methods(&self) -> &[HostMethod] {
            const M: &[HostMethod] = &[HostMethod::asynchronous("wait")];
            M
        }
        fn call(&self, _: &str, args: Vec<Json>) -> HostCall {
            let ms = args.first().and_then(Json::as_u64).unwrap_or(10);
            HostCall::Pending(
                async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok(json!(true))
                }
                .boxed_local(),
            )
        }
    }

    /// One worker, so every call below shares a runtime with the others.
    fn one_worker(limits: Limits) -> Arc<Engine> {
        Arc::new(
            Engine::start(EngineConfig {
                limits,
                workers: 1,
                ..EngineConfig::default()
            })
            .unwrap(),
        )
    }

    async fn call(engine: &Engine, src: &str, data: Json) -> Result<Json, ScriptError> {
        let script = Arc::new(compile("call", src).unwrap());
        let mut inv = Invocation::new(script, Mode::Class5, data);
        inv.ctx = Some(Box::new(WaitCtx));
        engine.run(inv).await.unwrap().result
    }

    #[test]
    fn blocks_are_charged_to_the_run_executing_and_credited_to_their_owner() {
        use rquickjs::allocator::Allocator;

        use super::{Ledger, LedgerAlloc};
        let ledger = std::rc::Rc::new(Ledger::new());
        let mut alloc = LedgerAlloc(ledger.clone());
        let (a, b) = (ledger.open(1000), ledger.open(1000));
        ledger.current.set(a);
        let p = alloc.alloc(600);
        assert!(!p.is_null());
        assert!(alloc.alloc(600).is_null(), "over a's limit");
        ledger.current.set(b);
        let q = alloc.alloc(600);
        assert!(!q.is_null(), "b has its own limit");
        // SAFETY: p and q came from this allocator.
        unsafe {
            assert_eq!(LedgerAlloc::usable_size(p), 600);
            alloc.dealloc(p);
            assert_eq!(
                (ledger.used(a), ledger.used(b)),
                (0, 600),
                "freed by b, credited to a"
            );
            // A run that ended gives its slot to the next; its late frees are not credited.
            ledger.close(b);
            let c = ledger.open(1000);
            assert_eq!(c, b);
            ledger.current.set(c);
            let r = alloc.realloc(std::ptr::null_mut(), 100);
            alloc.dealloc(q);
            assert_eq!(ledger.used(c), 100);
            let r = alloc.realloc(r, 900);
            assert!(!r.is_null());
            assert!(
                alloc.realloc(r, 1001).is_null(),
                "growing past the limit is refused"
            );
            assert_eq!(ledger.used(c), 900);
            alloc.dealloc(r);
            assert_eq!(ledger.used(c), 0);
        }
    }

    #[tokio::test]
    async fn calls_sharing_a_runtime_share_no_globals() {
        let engine = one_worker(Limits::default());
        let src = r#"var mine; async function main(d, ctx) {
            mine = d.i; globalThis.count = (globalThis.count || 0) + 1;
            Object.prototype.owner = d.i; Array.prototype.push = () => d.i;
            await ctx.wait(50);
            if (typeof FinalizationRegistry !== 'undefined' || typeof WeakRef !== 'function') throw 'weak';
            // Using WeakRef adds its intrinsic; FinalizationRegistry must not come back with it.
            if (typeof new WeakRef({}).deref !== 'function' || typeof FinalizationRegistry !== 'undefined') throw 'weak again';
            return [mine, globalThis.count, ({}).owner, [].push(0)];
        }"#;
        let runs = (0..40).map(|i| {
            let engine = engine.clone();
            async move { call(&engine, src, json!({"i": i})).await }
        });
        let results = futures::future::join_all(runs).await;
        for (i, r) in results.into_iter().enumerate() {
            assert_eq!(r, Ok(json!([i, 1, i, i])));
        }
    }

    #[tokio::test]
    async fn runaway_and_greedy_calls_fail_alone() {
        let limits = Limits {
            memory_bytes: 16 * 1024 * 1024,
            // Room for the good calls' churn on a loaded machine; the runaway still hits it.
            app_cpu: Duration::from_millis(1000),
            ..Limits::default()
        };
        let engine = one_worker(limits);
        let bad = [
            (
                "async function main(d, ctx){ await ctx.wait(20); while(true){} }",
                "CPU time limit of 1000 ms",
            ),
            (
                "async function main(d, ctx){ await ctx.wait(20); const a=[]; while(true){ a.push('x'.repeat(100000) + a.length) } }",
                "memory limit of 16 MiB",
            ),
            (
                "async function main(d, ctx){ await ctx.wait(20); const a=[]; while(true){ a.push({n: a.length, s: [a.length]}) } }",
                "memory limit of 16 MiB",
            ),
            (
                "async function main(d, ctx){ await ctx.wait(20); function f(n){ return f(n+1) + 1 } return f(0) }",
                "stack limit",
            ),
        ];
        // Good calls churn through more than their limit in garbage (some of it cyclic, so
        // it is collected in whichever call's slice the collector runs), keeping 5 MB live.
        let good = r#"async function main(d, ctx) {
            let kept = 0;
            for (let k = 0; k < 8; k++) {
                const a = [];
                for (let j = 0; j < 50; j++) { const o = {s: 'y'.repeat(100000) + j}; o.self = o; a.push(o); }
                kept = a.length;
                await ctx.wait(15);
            }
            return [d.i, kept];
        }"#;
        let bad_runs = bad.iter().map(|(src, _)| {
            let engine = engine.clone();
            async move { call(&engine, src, Json::Null).await }
        });
        let good_runs = (0..6).map(|i| {
            let engine = engine.clone();
            async move { call(&engine, good, json!({"i": i})).await }
        });
        let (bad_results, good_results) = futures::future::join(
            futures::future::join_all(bad_runs),
            futures::future::join_all(good_runs),
        )
        .await;
        for ((src, needle), r) in bad.iter().zip(bad_results) {
            let e = r.expect_err(src);
            assert!(e.message.contains(needle), "{src}: {e}");
        }
        for (i, r) in good_results.into_iter().enumerate() {
            assert_eq!(r, Ok(json!([i, 50])));
        }
        // And calls afterwards are served as usual.
        let after = call(
            &engine,
            "async function main(d, ctx){ await ctx.wait(1); return 7 }",
            Json::Null,
        )
        .await;
        assert_eq!(after, Ok(json!(7)));
    }
}
