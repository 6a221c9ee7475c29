//! A private memory region holding one QuickJS runtime, and an image of it that can be copied
//! back: the runtime, its context and the allocator's own state live inside the region, so
//! restoring the saved bytes returns the runtime exactly to the state they were saved in.
//!
//! The region is reserved once (`mmap`, never moved), so pointers QuickJS stores inside it stay
//! valid across restores. Its allocator is TLSF (`rlsf`): constant-time, and it merges freed
//! neighbours, so a run that frees one size of block can reuse the memory for another (size
//! classes without merging ran out of room well below the memory limit). The allocator's
//! structure sits at the region's start; its pool is the rest of the region.

use std::alloc::Layout;
use std::io;
use std::ptr::NonNull;

use rquickjs::allocator::Allocator;

/// First-level classes up to 32 << 40 bytes, 16 second-level classes each.
type Tlsf = rlsf::Tlsf<'static, u64, u16, 40, 16>;

/// Every block is 16-byte aligned, as malloc's are.
const ALIGN: usize = 16;

/// The allocator's state, at the start of the region.
#[repr(C)]
struct ArenaHeader {
    tlsf: Tlsf,
    /// One past the highest byte any block has reached (plus the header of the free block
    /// that follows it): everything a restore needs to rewrite, except the pool's end marker.
    high_water: usize,
}

const ARENA_HEADER: usize = std::mem::size_of::<ArenaHeader>().next_multiple_of(64);
/// TLSF keeps a marker block at the pool's end (whose back link changes as the last free
/// block moves): the tail this long is saved and restored with the head.
const TAIL: usize = 64;
/// Room above a block's end for the header of the free block TLSF splits off after it.
const FREE_HEADER_ROOM: usize = 64;

/// A reserved region of address space. Unmapped on drop: drop what lives in it first.
pub(crate) struct Arena {
    base: NonNull<u8>,
    len: usize,
}

/// What [`Arena::capture`] saved: the region's used head and its tail.
pub(crate) struct Image {
    head: Box<[u8]>,
    tail: Box<[u8]>,
}

impl Image {
    /// Bytes a restore copies.
    pub(crate) fn len(&self) -> usize {
        self.head.len() + self.tail.len()
    }
}

impl Arena {
    /// Reserve `capacity` bytes (rounded up to pages). Pages cost memory only once touched.
    pub(crate) fn new(capacity: usize) -> io::Result<Self> {
        let page = page_size();
        let len = capacity.max(ARENA_HEADER + 2 * page).next_multiple_of(page);
        // SAFETY: an anonymous private mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        let arena = Arena { base, len };
        // SAFETY: the mapping is at least ARENA_HEADER + 2 pages, page-aligned and zeroed;
        // the pool (the rest of it) is owned by the allocator for the arena's life.
        unsafe {
            let header = arena.header();
            header.write(ArenaHeader {
                tlsf: Tlsf::new(),
                high_water: base.as_ptr() as usize + ARENA_HEADER,
            });
            let pool = NonNull::slice_from_raw_parts(
                NonNull::new_unchecked(base.as_ptr().add(ARENA_HEADER)),
                len - ARENA_HEADER,
            );
            if (*header).tlsf.insert_free_block_ptr(pool).is_none() {
                return Err(io::Error::other("the arena is too small for its allocator"));
            }
        }
        Ok(arena)
    }

    /// An allocator for QuickJS that serves from this region. It must not outlive the arena.
    pub(crate) fn allocator(&self) -> ArenaAlloc {
        ArenaAlloc {
            header: self.header(),
        }
    }

    fn header(&self) -> *mut ArenaHeader {
        self.base.as_ptr().cast()
    }

    /// Bytes from the region's start to the highest byte used so far.
    pub(crate) fn used(&self) -> usize {
        // SAFETY: the header is valid for the arena's life.
        let high = unsafe { (*self.header()).high_water };
        (high - self.base.as_ptr() as usize).min(self.len - TAIL)
    }

    /// A copy of everything in use now: restoring it brings every allocation back.
    pub(crate) fn capture(&self) -> Image {
        let used = self.used();
        // SAFETY: both spans lie inside the mapping, which is initialised (zero pages, or
        // bytes written since).
        unsafe {
            Image {
                head: std::slice::from_raw_parts(self.base.as_ptr(), used).into(),
                tail: std::slice::from_raw_parts(self.base.as_ptr().add(self.len - TAIL), TAIL)
                    .into(),
            }
        }
    }

    /// Copy `image` (from [`Arena::capture`] on this arena) back over the region. Anything
    /// allocated since is forgotten; pages a large run used far above the image are given
    /// back to the kernel so one large run does not pin its memory.
    ///
    /// # Safety
    /// Nothing may hold a pointer into the region that the image does not account for: every
    /// handle taken since the capture must be gone, or it will point at restored memory.
    pub(crate) unsafe fn restore(&self, image: &Image) {
        let start = self.base.as_ptr() as usize;
        let reached = (*self.header()).high_water;
        std::ptr::copy_nonoverlapping(image.head.as_ptr(), self.base.as_ptr(), image.head.len());
        std::ptr::copy_nonoverlapping(
            image.tail.as_ptr(),
            self.base.as_ptr().add(self.len - TAIL),
            TAIL,
        );
        let keep = (start + image.head.len()).next_multiple_of(page_size()) + RESIDENT_SLACK;
        let tail_page = (start + self.len - TAIL) & !(page_size() - 1);
        let reached = reached.min(tail_page);
        if reached > keep {
            libc::madvise(
                keep as *mut libc::c_void,
                reached - keep,
                libc::MADV_DONTNEED,
            );
        }
    }
}

/// Pages above the image that stay resident between runs (the usual run's working memory).
const RESIDENT_SLACK: usize = 1024 * 1024;

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours and nothing lives in it any more (the owner's duty).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page).unwrap_or(4096).max(4096)
}

/// QuickJS's allocator over an [`Arena`].
pub(crate) struct ArenaAlloc {
    header: *mut ArenaHeader,
}

impl ArenaAlloc {
    /// # Safety
    /// The arena is alive (the allocator's owner guarantees it).
    unsafe fn take(&mut self, size: usize) -> *mut u8 {
        let Ok(layout) = Layout::from_size_align(size.max(1), ALIGN) else {
            return std::ptr::null_mut();
        };
        let h = &mut *self.header;
        match h.tlsf.allocate(layout) {
            Some(ptr) => {
                h.note(ptr, layout.size());
                ptr.as_ptr()
            }
            None => std::ptr::null_mut(),
        }
    }
}

impl ArenaHeader {
    fn note(&mut self, ptr: NonNull<u8>, size: usize) {
        let end = (ptr.as_ptr() as usize)
            .saturating_add(size)
            .saturating_add(FREE_HEADER_ROOM);
        if end > self.high_water {
            self.high_water = end;
        }
    }
}

// SAFETY: blocks come from TLSF over the arena's pool, 16-byte aligned and at least the size
// asked for; each is freed or resized with the alignment it was allocated with.
unsafe impl Allocator for ArenaAlloc {
    fn alloc(&mut self, size: usize) -> *mut u8 {
        // SAFETY: the arena outlives its runtime (see `Arena::allocator`).
        unsafe { self.take(size) }
    }

    fn calloc(&mut self, count: usize, size: usize) -> *mut u8 {
        let Some(total) = count.checked_mul(size) else {
            return std::ptr::null_mut();
        };
        // SAFETY: as in alloc; freed memory is reused, so zero it.
        unsafe {
            let ptr = self.take(total);
            if !ptr.is_null() {
                ptr.write_bytes(0, total);
            }
            ptr
        }
    }

    unsafe fn dealloc(&mut self, ptr: *mut u8) {
        if let Some(ptr) = NonNull::new(ptr) {
            (*self.header).tlsf.deallocate(ptr, ALIGN);
        }
    }

    unsafe fn realloc(&mut self, ptr: *mut u8, new_size: usize) -> *mut u8 {
        let Some(old) = NonNull::new(ptr) else {
            return self.alloc(new_size);
        };
        if new_size == 0 {
            self.dealloc(ptr);
            return std::ptr::null_mut();
        }
        let Ok(layout) = Layout::from_size_align(new_size, ALIGN) else {
            return std::ptr::null_mut();
        };
        let h = &mut *self.header;
        match h.tlsf.reallocate(old, layout) {
            Some(moved) => {
                h.note(moved, new_size);
                moved.as_ptr()
            }
            None => std::ptr::null_mut(),
        }
    }

    unsafe fn usable_size(ptr: *mut u8) -> usize {
        match NonNull::new(ptr) {
            Some(ptr) => Tlsf::allocation_usable_size(ptr),
            None => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_aligned_big_enough_and_refused_beyond_the_region() {
        let arena = Arena::new(1 << 20).expect("mmap");
        let mut a = arena.allocator();
        for size in [0, 1, 15, 16, 17, 100, 1000, 4096, 70_000] {
            let p = a.alloc(size);
            assert!(!p.is_null());
            assert_eq!(p as usize % ALIGN, 0);
            // SAFETY: p came from this allocator.
            assert!(unsafe { ArenaAlloc::usable_size(p) } >= size);
        }
        assert!(a.alloc(2 << 20).is_null(), "beyond the region: refused");
        assert!(
            a.calloc(usize::MAX / 2, 4).is_null(),
            "overflowing calloc: refused"
        );
    }

    #[test]
    fn memory_freed_in_small_blocks_serves_a_large_one() {
        let arena = Arena::new(4 << 20).expect("mmap");
        let mut a = arena.allocator();
        let small: Vec<*mut u8> = (0..20_000).map(|_| a.alloc(100)).collect();
        assert!(small.iter().all(|p| !p.is_null()));
        // SAFETY: each block came from this allocator and is freed once.
        small.iter().for_each(|p| unsafe { a.dealloc(*p) });
        let big = a.alloc(3 << 20);
        assert!(!big.is_null(), "the freed neighbours merged");
    }

    #[test]
    fn restore_forgets_later_allocations_and_brings_back_the_saved_bytes() {
        let arena = Arena::new(8 << 20).expect("mmap");
        let mut a = arena.allocator();
        let p = a.alloc(100);
        // SAFETY: p came from this allocator; nothing allocated after the capture is used
        // after the restore.
        unsafe {
            p.write_bytes(7, 100);
            let image = arena.capture();
            assert!(
                image.len() < ARENA_HEADER + 4096,
                "the image is the used head and the tail: {}",
                image.len()
            );
            let q = a.alloc(100);
            let big = a.calloc(1, 3 << 20);
            assert!(std::slice::from_raw_parts(big, 3 << 20)
                .iter()
                .all(|b| *b == 0));
            p.write_bytes(9, 100);
            a.dealloc(p);
            arena.restore(&image);
            assert_eq!(std::slice::from_raw_parts(p, 100), &[7u8; 100][..]);
            assert_eq!(a.alloc(100), q, "the allocator is back where it was");
            assert!(
                !a.alloc(6 << 20).is_null(),
                "all the later memory is free again"
            );
        }
    }

    #[test]
    fn realloc_keeps_the_data_and_zero_frees() {
        let arena = Arena::new(1 << 20).expect("mmap");
        let mut a = arena.allocator();
        // SAFETY: every pointer came from this allocator and is used as it allows.
        unsafe {
            let p = a.realloc(std::ptr::null_mut(), 20);
            p.write_bytes(3, 20);
            let grown = a.realloc(p, 5000);
            assert_eq!(std::slice::from_raw_parts(grown, 20), &[3u8; 20][..]);
            let shrunk = a.realloc(grown, 10);
            assert_eq!(std::slice::from_raw_parts(shrunk, 10), &[3u8; 10][..]);
            assert!(a.realloc(shrunk, 0).is_null());
        }
    }

    #[test]
    fn random_traffic_keeps_every_block_intact() {
        let arena = Arena::new(64 << 20).expect("mmap");
        let mut a = arena.allocator();
        let mut rng = fastrand::Rng::with_seed(7);
        let mut live: Vec<(*mut u8, usize, u8)> = Vec::new();
        let intact = |p: *mut u8, n: usize, tag: u8| {
            // SAFETY: p holds at least n bytes written with tag.
            unsafe { std::slice::from_raw_parts(p, n) }
                .iter()
                .all(|b| *b == tag)
        };
        for step in 0..100_000u32 {
            let size = rng.usize(0..6000);
            let tag = (step % 251) as u8;
            // About 3,000 blocks live at a time: 9 MB on average, well inside the region.
            let grow = if live.len() < 3000 { 2 } else { 1 };
            match rng.u8(0..4) {
                n if n < grow => {
                    let p = a.alloc(size);
                    assert!(!p.is_null());
                    // SAFETY: a fresh block of at least `size` bytes.
                    unsafe { p.write_bytes(tag, size) };
                    live.push((p, size, tag));
                }
                2 if !live.is_empty() => {
                    let (p, n, t) = live.swap_remove(rng.usize(..live.len()));
                    assert!(intact(p, n, t));
                    // SAFETY: p is live and freed once.
                    unsafe { a.dealloc(p) };
                }
                _ if !live.is_empty() => {
                    let i = rng.usize(..live.len());
                    let (p, n, t) = live[i];
                    assert!(intact(p, n, t));
                    // SAFETY: p is live; the old pointer is not used after the call.
                    let q = unsafe { a.realloc(p, size.max(1)) };
                    assert!(!q.is_null());
                    assert!(intact(q, n.min(size.max(1)), t));
                    // SAFETY: q holds at least size.max(1) bytes.
                    unsafe { q.write_bytes(tag, size.max(1)) };
                    live[i] = (q, size.max(1), tag);
                }
                _ => {}
            }
        }
        assert!(live.iter().all(|(p, n, t)| intact(*p, *n, *t)));
    }
}
