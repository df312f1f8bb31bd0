//! Kicking a vCPU out of KVM_RUN from another thread.
//!
//! The kicker sets a flag and sends a real-time signal to the vCPU's
//! thread. The signal handler sets `immediate_exit` in that thread's
//! `kvm_run`, so KVM_RUN returns EINTR whether the signal lands before or
//! during the call; the flag covers kicks that arrive while the vCPU is not
//! in `run` at all. No kick is lost and none needs a retry loop.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};

use kvm_ioctls::VcpuFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

thread_local! {
    /// The vCPU this thread is running, while it is inside `run`.
    static RUNNING_VCPU: Cell<*mut VcpuFd> = const { Cell::new(std::ptr::null_mut()) };
}

fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let vcpu = RUNNING_VCPU.with(Cell::get);
    if !vcpu.is_null() {
        // SAFETY: the pointer is set by `KickState::enter` on this same
        // thread to a `VcpuFd` borrowed mutably for the whole of `run`, and
        // cleared before that borrow ends; the signal is delivered on this
        // thread, so the pointee is alive. Setting immediate_exit is a plain
        // store into the kvm_run page, which is async-signal-safe.
        unsafe { (*vcpu).set_kvm_immediate_exit(1) };
    }
}

fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), on_kick) {
            // Without the handler a kick still works between runs (the flag),
            // just not during one.
            eprintln!("berth-hypervisor: cannot install the vCPU kick handler: {e}");
        }
    });
}

#[derive(Debug)]
pub struct KickState {
    pending: AtomicBool,
    /// The thread inside `run`, if any. Guarded so a kick never signals a
    /// thread id that has left `run` (and may have exited).
    thread: Mutex<Option<libc::pthread_t>>,
}

impl KickState {
    pub fn new() -> Arc<KickState> {
        install_handler();
        Arc::new(KickState {
            pending: AtomicBool::new(false),
            thread: Mutex::new(None),
        })
    }

    pub fn kick(&self) {
        self.pending.store(true, Ordering::SeqCst);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = *thread {
            // SAFETY: `t` is the id of a thread that is inside `run` (the
            // guard clears it under this lock before leaving), so it is a
            // live thread; the signal has a handler installed above.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    pub fn clear(&self) {
        self.pending.store(false, Ordering::SeqCst);
    }

    /// Marks this thread as running `fd`. Returns None if a kick is already
    /// pending (consuming it).
    pub fn enter<'a>(self: &'a Arc<Self>, fd: &mut VcpuFd) -> Option<RunGuard<'a>> {
        {
            let mut thread = self.thread.lock().unwrap_or_else(|e| e.into_inner());
            // SAFETY: pthread_self has no preconditions.
            *thread = Some(unsafe { libc::pthread_self() });
        }
        RUNNING_VCPU.with(|c| c.set(fd as *mut VcpuFd));
        let guard = RunGuard { state: self };
        // A kick from here on either sees its flag consumed below or sets
        // immediate_exit again through the handler.
        fd.set_kvm_immediate_exit(0);
        if self.pending.swap(false, Ordering::SeqCst) {
            return None; // the guard's drop undoes the registration
        }
        Some(guard)
    }
}

/// Undoes [`KickState::enter`] when `run` returns.
pub struct RunGuard<'a> {
    state: &'a KickState,
}

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        let mut thread = self.state.thread.lock().unwrap_or_else(|e| e.into_inner());
        *thread = None;
        RUNNING_VCPU.with(|c| c.set(std::ptr::null_mut()));
    }
}
