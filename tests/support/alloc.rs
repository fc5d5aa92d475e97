//! A global allocator that counts allocations per thread, for the tests that say what a path
//! allocates. Included with `#[path = "support/alloc.rs"] mod alloc;` and installed with
//! `#[global_allocator] static GLOBAL: alloc::Counting = alloc::Counting;`.
#![allow(dead_code)] // each test file uses its own part

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

pub struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// Counts per thread, so other tests running in parallel do not disturb the figure.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Allocations made on this thread so far.
pub fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// Calls timed by [`per_call`]: as many again run first, unmeasured.
pub const CALLS: u64 = 2_000;

/// Allocations on this thread per run of `call`, over [`CALLS`] runs after as many unmeasured
/// ones.
pub async fn per_call<F: AsyncFnMut()>(mut call: F) -> f64 {
    for _ in 0..CALLS {
        call().await;
    }
    let before = allocations();
    for _ in 0..CALLS {
        call().await;
    }
    (allocations() - before) as f64 / CALLS as f64
}
