//! Settings of glibc's allocator that keep the memory a node takes for
//! message bodies near its budget (`smtp.max_body_memory`,
//! docs/security.md) without paying for that while bodies are few.
//!
//! - glibc gives threads that allocate at once arenas of their own, up to
//!   eight per core, and keeps what is freed in each: with a thousand large
//!   bodies going to disk through the blocking pool that was over 200 MB
//!   beyond the budget. Two arenas (`MALLOC_ARENA_MAX`).
//! - Where blocks of 128 KiB and more come from follows the budget
//!   (`Placement`). Taken from the heap, a freed block is reused by the
//!   next message; mapped, each one is faulted in page by page and unmapped
//!   when freed, which cost a sixth of a node's CPU relaying 100 KB
//!   messages through Redis. But what a flood of large bodies leaves in the
//!   heap stays there (280 MB after 1,000 × 10 MB, against 37 MB mapped).
//!   So large blocks come from the heap while bodies hold at most a quarter
//!   of the budget, are mapped while they hold more, and come from the heap
//!   again, with what it holds free given back (`malloc_trim`), once bodies
//!   are down to an eighth.
//!
//! Each setting is left alone when the environment sets it
//! (`MALLOC_ARENA_MAX`, `MALLOC_MMAP_THRESHOLD_`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::body_memory::BodyMemory;

/// Where glibc takes blocks of 128 KiB and more from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placement {
    /// From the heap, up to 8 MiB: a batch of stores of 100 KB bodies,
    /// but not the 19 MiB a password check takes, which goes back at once.
    Heap,
    /// Mapped for each block and unmapped when it is freed.
    Mapped,
}

impl Placement {
    /// Where large blocks should come from with `used` of `limit` bytes of
    /// bodies in memory. The gap between a quarter and an eighth keeps a
    /// budget hovering at one mark from switching at every message.
    fn next(self, used: u64, limit: u64) -> Placement {
        match self {
            Placement::Heap if used > limit / 4 => Placement::Mapped,
            Placement::Mapped if used < limit / 8 => Placement::Heap,
            same => same,
        }
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn threshold(self) -> libc::c_int {
        match self {
            Placement::Heap => 8 << 20,
            Placement::Mapped => 128 << 10,
        }
    }
}

/// Whether [`follow`] sets the threshold: only after [`tune_at_start`],
/// and only when the environment did not fix it.
static FOLLOWING: AtomicBool = AtomicBool::new(false);
/// The placement set last, read without the lock to skip it when
/// nothing changes.
static MAPPED: AtomicBool = AtomicBool::new(false);
/// Held while the placement changes, so that two threads crossing a mark
/// at once leave glibc's setting and [`MAPPED`] in agreement.
static CHANGING: Mutex<()> = Mutex::new(());

/// Sets the allocator up for the node. Called before any thread starts.
pub fn tune_at_start() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            // SAFETY: mallopt only sets an allocator parameter.
            unsafe {
                libc::mallopt(libc::M_ARENA_MAX, 2);
            }
        }
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            set_threshold(Placement::Heap);
            FOLLOWING.store(true, Ordering::Release);
        }
    }
}

/// Moves the placement of large blocks after `bodies` changed, if that
/// crossed a mark. Called by the budget on every take and give back; costs
/// three atomic loads when no mark is crossed.
pub(crate) fn follow(bodies: &BodyMemory) {
    if !FOLLOWING.load(Ordering::Acquire) {
        return;
    }
    let current = placement(MAPPED.load(Ordering::Acquire));
    if current.next(bodies.used(), bodies.limit()) == current {
        return;
    }
    let _changing = CHANGING.lock().unwrap_or_else(|e| e.into_inner());
    let current = placement(MAPPED.load(Ordering::Acquire));
    let next = current.next(bodies.used(), bodies.limit());
    if next == current {
        return;
    }
    set_threshold(next);
    MAPPED.store(next == Placement::Mapped, Ordering::Release);
    if next == Placement::Heap {
        give_back_free_heap();
    }
}

fn placement(mapped: bool) -> Placement {
    if mapped {
        Placement::Mapped
    } else {
        Placement::Heap
    }
}

fn set_threshold(placement: Placement) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; glibc reads it
    // under its own locks, and changes it itself while threads run.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, placement.threshold());
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = placement;
}

/// Gives the kernel back the heap's free pages on a thread of its own:
/// walking the arenas takes a while when a flood left much behind, and the
/// caller is a session on an event loop.
fn give_back_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let trim = || {
            // SAFETY: malloc_trim takes the arenas' locks itself.
            unsafe {
                libc::malloc_trim(0);
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name("malloc-trim".into())
            .spawn(trim)
        {
            tracing::debug!("no thread to give free heap memory back: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_blocks_are_mapped_past_a_quarter_and_come_from_the_heap_again_below_an_eighth() {
        use Placement::*;
        let limit = 800;
        // (from, used, to)
        let table = [
            (Heap, 0, Heap),
            (Heap, 200, Heap),
            (Heap, 201, Mapped),
            (Heap, 800, Mapped),
            (Mapped, 800, Mapped),
            (Mapped, 200, Mapped),
            (Mapped, 100, Mapped),
            (Mapped, 99, Heap),
            (Mapped, 0, Heap),
            (Heap, 150, Heap),
        ];
        for (from, used, to) in table {
            assert_eq!(from.next(used, limit), to, "{from:?} at {used}/{limit}");
        }
    }
}
