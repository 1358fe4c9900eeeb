//! Running a built VM: one thread a vCPU, the event loop on the calling thread (exit requests,
//! serial input, the VT-d's deferred-flush timer, queue doorbells and the interrupt signals its
//! remapping blocks, the IOAPIC's storm guard,
//! ACPI S3: getting the vCPUs out of a sleeping guest and waking it), and the stop that kicks
//! every vCPU once.

use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::acpi::FACS_WAKING_VECTOR_OFFSET;
use crate::builder::SerialIn;
use crate::device_manager::DeviceManager;
use crate::devices::legacy::serial::{InputSource, SerialInput};
use crate::devices::vtd::inject::InjectControl;
use crate::devices::vtd::{self, DeferredFlushTimer, DoorbellWatcher};
use crate::exit::{ExitHandle, VmExit};
use crate::sleep::{Resume, SleepHandle};
use crate::vstate::kick::{install_kick_handler, kick_signal, KickError};
use crate::vstate::vcpu::{Vcpu, VcpuBuses};

/// How long the event loop sleeps at most before it looks at the exit reason again.
const EVENT_LOOP_TIMEOUT_MS: i32 = 200;
/// While the guest enters S3: how often the event loop looks whether every vCPU has parked.
const SLEEP_POLL_MS: i32 = 5;

/// Errors running a VM; each says what failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The vCPU kick signal handler could not be installed.
    #[error(transparent)]
    Kick(#[from] KickError),
    /// A vCPU thread could not be started.
    #[error("cannot spawn the thread of vCPU {id}: {source}")]
    SpawnVcpu { id: usize, source: std::io::Error },
    /// The event loop's epoll failed.
    #[error("event loop: {0}")]
    EventManager(#[source] event_manager::Error),
    /// A host resource of the event loop (an eventfd, a timer) could not be set up.
    #[error("{what}: {source}")]
    Host {
        what: &'static str,
        source: std::io::Error,
    },
}

fn host(what: &'static str) -> impl FnOnce(std::io::Error) -> RunError {
    move |source| RunError::Host { what, source }
}

/// What the run loop needs to take the machine through ACPI S3 (see [`crate::sleep`]).
pub(crate) struct S3<'a> {
    /// The machine's sleep state, shared with the PM1 block and the vCPUs.
    pub sleep: &'a SleepHandle,
    /// Guest RAM, which holds the FACS.
    pub mem: &'a GuestMemoryMmap,
    /// The FACS, where the OS leaves the waking vector firmware jumps to on resume.
    pub facs_addr: u64,
}

/// Runs `vcpus` until the guest powers off, resets, panics, halts (raw guests) or fails.
pub(crate) fn run(
    vcpus: Vec<Vcpu>,
    devices: &DeviceManager,
    exit: &ExitHandle,
    serial_in: Option<SerialIn>,
    s3: S3<'_>,
) -> Result<VmExit, RunError> {
    install_kick_handler()?;
    let stop = Arc::new(AtomicBool::new(false));
    let buses = VcpuBuses {
        pio: devices.pio_bus().clone(),
        mmio: devices.mmio_bus().clone(),
        ioapic: devices.ioapic().map(|io| io.shared().clone()),
        origins: devices.vtd().is_some_and(|v| vtd::lock(v).config().check),
    };
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let mut spawn_error = None;
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        let (b, e, s) = (buses.clone(), exit.clone(), stop.clone());
        let sleep = s3.sleep.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                // A panicking vCPU thread must still end the run, not leave it waiting.
                let _guard = PanicGuard(e.clone());
                vcpu.run(b, e, s, sleep)
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(source) => {
                spawn_error = Some(RunError::SpawnVcpu { id, source });
                break;
            }
        }
    }

    let result = match spawn_error {
        Some(e) => Err(e),
        None => event_loop(devices, exit, serial_in, SleepTender::new(s3, &threads)),
    };
    let panicked = stop_vcpus(threads, &stop);
    // No device may keep reaching memory the guest unmapped once the VM is gone.
    if let Some(vtd) = devices.vtd() {
        vtd::lock(vtd).flush_deferred();
    }
    if panicked {
        return Ok(VmExit::Failed("a vCPU thread panicked".into()));
    }
    result
}

fn event_loop(
    devices: &DeviceManager,
    exit: &ExitHandle,
    serial_in: Option<SerialIn>,
    mut sleep: SleepTender<'_>,
) -> Result<VmExit, RunError> {
    let mut em = EventManager::<Box<dyn MutEventSubscriber + Send>>::new()
        .map_err(RunError::EventManager)?;
    let exit_evt = exit
        .event()
        .try_clone()
        .map_err(host("cannot clone the exit eventfd"))?;
    em.add_subscriber(Box::new(ExitWatcher(exit_evt)));
    let sleep_evt = sleep
        .event()
        .try_clone()
        .map_err(host("cannot clone the sleep eventfd"))?;
    em.add_subscriber(Box::new(ExitWatcher(sleep_evt)));
    if let Some(ioapic) = devices.ioapic() {
        em.add_subscriber(Box::new(ioapic.storm_timer()));
    }
    if let Some(remapping) = devices.interrupt_remapping() {
        em.add_subscriber(Box::new(remapping.blocked_handler()));
    }
    if let Some(vtd) = devices.vtd() {
        if let Some(timer) = DeferredFlushTimer::new(vtd.clone())
            .map_err(host("cannot create the VT-d deferred-flush timer"))?
        {
            em.add_subscriber(Box::new(timer));
        }
        if vtd.doorbells().is_some() {
            em.add_subscriber(Box::new(DoorbellWatcher(vtd.clone())));
        }
        if let Some(path) = vtd.inject_control() {
            let control = InjectControl::new(vtd.clone(), path.to_path_buf())
                .map_err(host("cannot create the VT-d inject control timer"))?;
            em.add_subscriber(Box::new(control));
        }
    }
    let is_stdin = matches!(serial_in, Some(SerialIn::Stdin));
    let input: Option<Box<dyn InputSource>> = match serial_in {
        Some(SerialIn::Stdin) => Some(Box::new(std::io::stdin())),
        Some(SerialIn::Stream(s)) => Some(s),
        Some(SerialIn::None) | None => None,
    };
    let _raw = match input {
        Some(input) => {
            let sub = SerialInput::new(input, devices.serial().clone())
                .map_err(host("cannot set up serial input"))?;
            em.add_subscriber(Box::new(sub));
            if is_stdin {
                RawTerminal::enter()
            } else {
                None
            }
        }
        None => None,
    };
    loop {
        if let Some(reason) = exit.reason() {
            return Ok(reason);
        }
        let timeout = match sleep.tend(devices) {
            Ok(ms) => ms,
            Err(exit) => return Ok(exit),
        };
        em.run_with_timeout(timeout)
            .map_err(RunError::EventManager)?;
    }
}

/// The event loop's part in ACPI S3. Once the guest suspends, each vCPU gets one kick out of
/// the guest (it parks at its next look at the sleep state: a kick makes KVM_RUN return even
/// when it lands just before it). Once all are parked, the machine wakes when the guest's wake
/// event is due, at the FACS waking vector, as firmware resumes a PC.
struct SleepTender<'a> {
    s3: S3<'a>,
    threads: &'a [JoinHandle<()>],
    /// Whether this sleep's kicks went out.
    kicked: bool,
    /// This sleep's wake time, worked out once every vCPU parked; `Some(None)`: no wake event.
    wake_at: Option<Option<Duration>>,
}

impl<'a> SleepTender<'a> {
    fn new(s3: S3<'a>, threads: &'a [JoinHandle<()>]) -> Self {
        Self {
            s3,
            threads,
            kicked: false,
            wake_at: None,
        }
    }

    /// Signalled when the guest suspends.
    fn event(&self) -> &EventFd {
        self.s3.sleep.event()
    }

    /// Looks after a sleeping machine. Returns how many ms the event loop may wait before
    /// looking again, or the exit when the wake finds no waking vector (firmware would reboot).
    fn tend(&mut self, devices: &DeviceManager) -> Result<i32, VmExit> {
        let sleep = self.s3.sleep;
        if !sleep.is_asleep() {
            return Ok(EVENT_LOOP_TIMEOUT_MS);
        }
        if !self.kicked {
            kick_vcpus(self.threads);
            self.kicked = true;
        }
        if sleep.parked() < self.threads.len() {
            return Ok(SLEEP_POLL_MS);
        }
        // Without a wake event the machine sleeps until the VMM is stopped.
        let Some(at) = *self.wake_at.get_or_insert_with(|| devices.s3_wake_time()) else {
            return Ok(EVENT_LOOP_TIMEOUT_MS);
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        if now < at {
            let ms = (at - now).as_millis() + 1;
            return Ok(ms.min(EVENT_LOOP_TIMEOUT_MS as u128) as i32);
        }
        // Firmware's resume path: the OS's waking vector from the FACS.
        let vector: u32 = self
            .s3
            .mem
            .read_obj(GuestAddress(self.s3.facs_addr + FACS_WAKING_VECTOR_OFFSET))
            .unwrap_or(0);
        let Some(resume) = Resume::at_waking_vector(vector) else {
            return Err(VmExit::Reboot {
                cause: "S3 wake without a real-mode waking vector in the FACS",
            });
        };
        devices.note_s3_wake_by_rtc();
        sleep.wake(resume);
        self.kicked = false;
        self.wake_at = None;
        Ok(EVENT_LOOP_TIMEOUT_MS)
    }
}

/// Stops and joins the vCPU threads; true if one of them panicked. One kick each suffices: a
/// kick makes KVM_RUN return even when it lands just before the thread enters it.
fn stop_vcpus(threads: Vec<JoinHandle<()>>, stop: &AtomicBool) -> bool {
    stop.store(true, Ordering::Release);
    kick_vcpus(&threads);
    threads.into_iter().any(|t| t.join().is_err())
}

/// Sends each running vCPU thread one kick, which gets it out of KVM_RUN.
fn kick_vcpus(threads: &[JoinHandle<()>]) {
    for t in threads.iter().filter(|t| !t.is_finished()) {
        // A thread that ends meanwhile is still joinable, so the signal goes nowhere harmful.
        if let Err(e) = t.kill(kick_signal()) {
            log::warn!("cannot kick vCPU thread {:?}: {e}", t.thread().name());
        }
    }
}

/// Reports a vCPU thread that unwinds as a failed run.
struct PanicGuard(ExitHandle);

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0
                .request(VmExit::Failed("a vCPU thread panicked".into()));
        }
    }
}

/// Drains an eventfd (the exit's or the sleep's) so the loop wakes to look at the VM's state.
struct ExitWatcher(EventFd);

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            log::error!("cannot poll the exit eventfd: {e}");
        }
    }
}

/// Puts an interactive terminal in raw mode for the guest console; restores it on drop.
struct RawTerminal;

impl RawTerminal {
    fn enter() -> Option<Self> {
        use vmm_sys_util::terminal::Terminal;
        let stdin = std::io::stdin();
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(stdin.as_raw_fd()) } != 1 {
            return None;
        }
        match stdin.lock().set_raw_mode() {
            Ok(()) => Some(RawTerminal),
            Err(e) => {
                log::warn!("cannot set the terminal to raw mode: {e}");
                None
            }
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        use vmm_sys_util::terminal::Terminal;
        if let Err(e) = std::io::stdin().lock().set_canon_mode() {
            log::warn!("cannot restore the terminal: {e}");
        }
    }
}
