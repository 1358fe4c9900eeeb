//! Which guest instruction a device model is working for: the vCPU and the instruction pointer
//! of the MMIO write whose exit the current thread is handling.
//!
//! A device model that reports guest mistakes (the VT-d's protocol checker) names the driver
//! line that exposed each one. The vCPU thread knows it; the model, a plain state machine, does
//! not. The VMM reads the instruction pointer only when a model asked for it (reading it costs
//! an ioctl), and scopes it around the dispatch of the write with [`scope`]; the model reads it
//! with [`current`] when it has something to report. Work the VMM does on other threads (an
//! event loop draining doorbells) runs with none.

use std::cell::Cell;

/// The vCPU whose exit is being handled and the address of the instruction that exited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Origin {
    pub vcpu: u32,
    pub rip: u64,
}

thread_local! {
    static CURRENT: Cell<Option<Origin>> = const { Cell::new(None) };
}

/// The origin the current thread is handling, if any.
pub fn current() -> Option<Origin> {
    CURRENT.with(Cell::get)
}

/// Runs `f` with `origin` as the current one, restoring the previous one after.
pub fn scope<R>(origin: Option<Origin>, f: impl FnOnce() -> R) -> R {
    let previous = CURRENT.with(|c| c.replace(origin));
    let result = f();
    CURRENT.with(|c| c.set(previous));
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_origin_is_current_inside_its_scope_only_and_per_thread() {
        assert_eq!(current(), None);
        let o = Origin {
            vcpu: 1,
            rip: 0xffff_8000_1234,
        };
        scope(Some(o), || {
            assert_eq!(current(), Some(o));
            std::thread::spawn(|| assert_eq!(current(), None))
                .join()
                .expect("thread");
            scope(None, || assert_eq!(current(), None));
            assert_eq!(current(), Some(o), "restored after a nested scope");
        });
        assert_eq!(current(), None);
    }
}
