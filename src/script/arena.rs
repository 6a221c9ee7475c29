//! A private memory region holding one QuickJS runtime, and an image of it that can be copied
//! back: the runtime, its context and every allocator structure live inside the region, so
//! restoring the saved bytes returns the runtime exactly to the state they were saved in.
//!
//! The region is reserved once (`mmap`, never moved), so pointers QuickJS stores inside it stay
//! valid across restores. The allocator keeps all its state in the region's first bytes:
//! size-classed free lists (16-byte steps up to 1 KiB, then four classes per power of two)
//! over a bump pointer. Nothing is ever returned to the bump pointer; a freed block waits in
//! its class's list for the next request of that class.

use std::io;
use std::ptr::NonNull;

use rquickjs::allocator::Allocator;

/// Bytes before each block: its class. 16 keeps blocks 16-byte aligned.
const BLOCK_HEADER: usize = 16;
/// Classes of 16-byte steps (16 ..= 1024 bytes).
const SMALL_CLASSES: usize = 64;
const SMALL_LIMIT: usize = SMALL_CLASSES * 16;
/// Four classes per power of two above 1 KiB, up to 2^47 bytes.
const CLASSES: usize = SMALL_CLASSES + 4 * 38;

/// The allocator's state, at the start of the region.
#[repr(C)]
struct ArenaHeader {
    /// Address of the first byte never handed out.
    bump: usize,
    /// One past the region's last byte.
    end: usize,
    /// Highest `bump` reached since the pages above the image were last released.
    high_water: usize,
    /// Head of each class's free list (the address of a freed block's first user byte), or 0.
    free: [usize; CLASSES],
}

const ARENA_HEADER: usize = std::mem::size_of::<ArenaHeader>().next_multiple_of(16);

/// The class of a request: its index and the bytes a block of that class can hold.
fn class_of(size: usize) -> Option<(usize, usize)> {
    let size = size.max(1);
    if size <= SMALL_LIMIT {
        let index = size.div_ceil(16) - 1;
        return Some((index, (index + 1) * 16));
    }
    // size is in (2^e, 2^(e+1)] with e >= 10; quarter steps of 2^(e-2).
    let e = usize::BITS - 1 - (size - 1).leading_zeros();
    let base = 1usize << e;
    let step = base >> 2;
    let sub = (size - base).div_ceil(step);
    let index = SMALL_CLASSES + (e as usize - 10) * 4 + (sub - 1);
    (index < CLASSES).then_some((index, base + sub * step))
}

fn usable_of(index: usize) -> usize {
    if index < SMALL_CLASSES {
        return (index + 1) * 16;
    }
    let rel = index - SMALL_CLASSES;
    let base = 1usize << (10 + rel / 4);
    base + (rel % 4 + 1) * (base >> 2)
}

/// A reserved region of address space. Unmapped on drop: drop what lives in it first.
pub(crate) struct Arena {
    base: NonNull<u8>,
    len: usize,
}

impl Arena {
    /// Reserve `capacity` bytes (rounded up to pages). Pages cost memory only once touched.
    pub(crate) fn new(capacity: usize) -> io::Result<Self> {
        let page = page_size();
        let len = capacity.max(ARENA_HEADER + page).next_multiple_of(page);
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
        let start = base.as_ptr() as usize;
        // SAFETY: the mapping is at least ARENA_HEADER bytes, page-aligned and zeroed.
        unsafe {
            let header = base.as_ptr().cast::<ArenaHeader>();
            (*header).bump = start + ARENA_HEADER;
            (*header).end = start + len;
            (*header).high_water = start + ARENA_HEADER;
        }
        Ok(Arena { base, len })
    }

    /// An allocator for QuickJS that serves from this region. It must not outlive the arena.
    pub(crate) fn allocator(&self) -> ArenaAlloc {
        ArenaAlloc {
            header: self.base.as_ptr().cast(),
        }
    }

    fn header(&self) -> *mut ArenaHeader {
        self.base.as_ptr().cast()
    }

    /// Bytes from the region's start to the first never-used byte.
    pub(crate) fn used(&self) -> usize {
        // SAFETY: the header is valid for the arena's life.
        unsafe { (*self.header()).bump - self.base.as_ptr() as usize }
    }

    /// A copy of everything in use now: restoring it brings every allocation back.
    pub(crate) fn capture(&self) -> Box<[u8]> {
        // SAFETY: [base, base + used) is mapped and initialised (written before handed out, or
        // zero from the mapping).
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.used()).into() }
    }

    /// Copy `image` (from [`Arena::capture`] on this arena) back over the region. Anything
    /// allocated since is forgotten; pages it used far above the image are given back to the
    /// kernel so one large run does not pin its memory.
    ///
    /// # Safety
    /// Nothing may hold a pointer into the region that the image does not account for: every
    /// handle taken since the capture must be gone, or it will point at restored memory.
    pub(crate) unsafe fn restore(&self, image: &[u8]) {
        debug_assert!(image.len() <= self.len);
        let header = self.header();
        let high = (*header).high_water.max((*header).bump);
        std::ptr::copy_nonoverlapping(image.as_ptr(), self.base.as_ptr(), image.len());
        let start = self.base.as_ptr() as usize;
        let keep = (start + image.len()).next_multiple_of(page_size()) + RESIDENT_SLACK;
        if high > keep {
            libc::madvise(keep as *mut libc::c_void, high - keep, libc::MADV_DONTNEED);
            (*header).high_water = (*header).bump;
        } else {
            (*header).high_water = high;
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
        let Some((index, usable)) = class_of(size) else {
            return std::ptr::null_mut();
        };
        let h = &mut *self.header;
        let head = h.free[index];
        if head != 0 {
            h.free[index] = (head as *const usize).read();
            return head as *mut u8;
        }
        let Some(next) = h.bump.checked_add(BLOCK_HEADER + usable) else {
            return std::ptr::null_mut();
        };
        if next > h.end {
            return std::ptr::null_mut();
        }
        let block = h.bump as *mut u8;
        block.cast::<usize>().write(index);
        h.bump = next;
        if next > h.high_water {
            h.high_water = next;
        }
        block.add(BLOCK_HEADER)
    }
}

// SAFETY: blocks are 16-byte aligned, hold at least the size asked for (their class's size),
// never overlap (bump-allocated once, then recycled whole through their class's list), and
// `usable_size` reads the class written before each block.
unsafe impl Allocator for ArenaAlloc {
    fn alloc(&mut self, size: usize) -> *mut u8 {
        // SAFETY: the arena outlives its runtime (see `Arena::allocator`).
        unsafe { self.take(size) }
    }

    fn calloc(&mut self, count: usize, size: usize) -> *mut u8 {
        let Some(total) = count.checked_mul(size) else {
            return std::ptr::null_mut();
        };
        // SAFETY: as in alloc; recycled blocks hold old bytes, so zero them.
        unsafe {
            let ptr = self.take(total);
            if !ptr.is_null() {
                ptr.write_bytes(0, total);
            }
            ptr
        }
    }

    unsafe fn dealloc(&mut self, ptr: *mut u8) {
        let index = ptr.sub(BLOCK_HEADER).cast::<usize>().read();
        let h = &mut *self.header;
        ptr.cast::<usize>().write(h.free[index]);
        h.free[index] = ptr as usize;
    }

    unsafe fn realloc(&mut self, ptr: *mut u8, new_size: usize) -> *mut u8 {
        if ptr.is_null() {
            return self.alloc(new_size);
        }
        if new_size == 0 {
            self.dealloc(ptr);
            return std::ptr::null_mut();
        }
        let old = Self::usable_size(ptr);
        if new_size <= old {
            return ptr;
        }
        let grown = self.take(new_size);
        if grown.is_null() {
            return grown;
        }
        std::ptr::copy_nonoverlapping(ptr, grown, old);
        self.dealloc(ptr);
        grown
    }

    unsafe fn usable_size(ptr: *mut u8) -> usize {
        usable_of(ptr.sub(BLOCK_HEADER).cast::<usize>().read())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_hold_their_requests_and_waste_at_most_a_quarter_above_1k() {
        for size in (1..5000).chain([1 << 20, (1 << 20) + 1, 3 << 25, 1 << 40]) {
            let (index, usable) = class_of(size).expect("has a class");
            assert!(usable >= size, "{size} -> {usable}");
            assert_eq!(usable_of(index), usable, "{size}");
            if size > SMALL_LIMIT {
                assert!(usable - size <= size / 4 + 1, "{size} -> {usable}");
            } else {
                assert!(usable - size < 16);
            }
        }
        assert!(class_of(usize::MAX / 2).is_none());
    }

    #[test]
    fn freed_blocks_are_reused_and_restore_forgets_later_allocations() {
        let arena = Arena::new(1 << 20).expect("mmap");
        let mut a = arena.allocator();
        let p = a.alloc(100);
        assert_eq!(p as usize % 16, 0);
        // SAFETY: p came from this allocator.
        unsafe {
            p.write_bytes(7, 100);
            assert_eq!(ArenaAlloc::usable_size(p), 112);
        }
        let image = arena.capture();
        let used = arena.used();
        let q = a.alloc(100);
        assert_ne!(p, q);
        // SAFETY: q came from this allocator and is not used again.
        unsafe { a.dealloc(q) };
        assert_eq!(
            a.alloc(97),
            q,
            "the freed block of the same class comes back"
        );
        let big = a.calloc(1, 300_000);
        assert!(!big.is_null());
        // SAFETY: calloc zeroed 300,000 bytes.
        assert!(unsafe { std::slice::from_raw_parts(big, 300_000) }
            .iter()
            .all(|b| *b == 0));
        assert!(a.alloc(2 << 20).is_null(), "beyond the region: refused");
        // SAFETY: nothing outside holds pointers allocated after the capture.
        unsafe {
            p.write_bytes(9, 100);
            arena.restore(&image);
            assert_eq!(std::slice::from_raw_parts(p, 100), &[7u8; 100][..]);
        }
        assert_eq!(arena.used(), used);
        assert_eq!(a.alloc(100), q, "the bump pointer went back too");
    }

    #[test]
    fn realloc_grows_in_place_within_the_class_and_moves_beyond_it() {
        let arena = Arena::new(1 << 20).expect("mmap");
        let mut a = arena.allocator();
        let p = a.alloc(20);
        // SAFETY: p and its successors came from this allocator.
        unsafe {
            p.write_bytes(3, 20);
            assert_eq!(a.realloc(p, 32), p);
            let moved = a.realloc(p, 5000);
            assert_ne!(moved, p);
            assert_eq!(std::slice::from_raw_parts(moved, 20), &[3u8; 20][..]);
            assert!(a.realloc(moved, 0).is_null());
        }
    }
}
