use std::sync::atomic::{AtomicBool, Ordering};

use vm_device::dma::HostOp;

use super::*;

const SHARED: u32 = 7;
const OWN_A: u32 = 8;
const OWN_B: u32 = 9;

/// A device that records what it is attached to and refuses attaching when told.
#[derive(Default)]
struct FakeDevice {
    attached: Mutex<Vec<u32>>,
    refuse: AtomicBool,
}

impl AttachPt for FakeDevice {
    fn attach_pt(&self, pt_id: u32) -> std::io::Result<()> {
        if self.refuse.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(libc::EBUSY));
        }
        self.attached.lock().unwrap().push(pt_id);
        Ok(())
    }
}

impl FakeDevice {
    fn now(&self) -> Option<u32> {
        self.attached.lock().unwrap().last().copied()
    }
}

/// Guest RAM in the shared IOAS: how often mapped and unmapped, and whether mapped now.
#[derive(Clone, Default)]
struct FakeRam(Arc<Mutex<(u32, u32, bool, bool)>>);

impl FakeRam {
    fn maps(&self) -> u32 {
        self.0.lock().unwrap().0
    }
    fn unmaps(&self) -> u32 {
        self.0.lock().unwrap().1
    }
    fn mapped(&self) -> bool {
        self.0.lock().unwrap().2
    }
    fn refuse_maps(&self) {
        self.0.lock().unwrap().3 = true;
    }
}

impl GuestRam for FakeRam {
    fn map_guest_ram(&mut self) -> Result<(), HostDmaError> {
        let mut s = self.0.lock().unwrap();
        if s.3 {
            return Err(HostDmaError::new(
                HostOp::Map,
                0,
                1 << 30,
                std::io::Error::from_raw_os_error(libc::ENOMEM),
            ));
        }
        s.0 += 1;
        s.2 = true;
        Ok(())
    }
    fn unmap_guest_ram(&mut self) -> Result<(), HostDmaError> {
        let mut s = self.0.lock().unwrap();
        s.1 += 1;
        s.2 = false;
        Ok(())
    }
}

/// The device's own domain: the maps and unmaps asked of it.
#[derive(Clone, Default)]
struct FakeOwn(Arc<Mutex<Vec<(u64, u64)>>>);

impl HostDma for FakeOwn {
    fn map(&mut self, iova: u64, _: u64, len: u64, _: Perm) -> Result<(), HostDmaError> {
        self.0.lock().unwrap().push((iova, len));
        Ok(())
    }
    fn unmap(&mut self, iova: u64, len: u64) -> Result<(), HostDmaError> {
        self.0.lock().unwrap().retain(|&m| m != (iova, len));
        Ok(())
    }
}

fn switch(
    bdf: &str,
    own_ioas: u32,
    shared: &Arc<IdentityDomain>,
) -> (IoasSwitch<FakeDevice>, Arc<FakeDevice>, FakeOwn) {
    let device = Arc::new(FakeDevice::default());
    let own = FakeOwn::default();
    let s = IoasSwitch::new(
        bdf.to_string(),
        device.clone(),
        Box::new(own.clone()),
        own_ioas,
        shared.clone(),
    );
    (s, device, own)
}

#[test]
fn two_devices_on_the_identity_domain_map_guest_ram_once_and_the_last_out_unmaps_it() {
    let ram = FakeRam::default();
    let shared = IdentityDomain::new(SHARED, Box::new(ram.clone()));
    let (mut a, dev_a, _) = switch("a", OWN_A, &shared);
    let (mut b, dev_b, _) = switch("b", OWN_B, &shared);
    assert!(a.use_identity(true).unwrap());
    assert!(b.use_identity(true).unwrap());
    assert_eq!((dev_a.now(), dev_b.now()), (Some(SHARED), Some(SHARED)));
    assert_eq!(ram.maps(), 1, "pinned once for both");
    assert!(a.use_identity(false).unwrap());
    assert_eq!(dev_a.now(), Some(OWN_A));
    assert!(ram.mapped(), "b still uses it");
    b.use_identity(false).unwrap();
    assert_eq!(dev_b.now(), Some(OWN_B));
    assert!(!ram.mapped());
    assert_eq!(ram.unmaps(), 1);
}

#[test]
fn switching_to_where_the_device_is_does_nothing() {
    let ram = FakeRam::default();
    let shared = IdentityDomain::new(SHARED, Box::new(ram.clone()));
    let (mut a, dev, _) = switch("a", OWN_A, &shared);
    assert!(a.use_identity(false).unwrap());
    a.use_identity(true).unwrap();
    a.use_identity(true).unwrap();
    assert_eq!(*dev.attached.lock().unwrap(), vec![SHARED]);
    assert_eq!(ram.maps(), 1);
}

#[test]
fn maps_and_unmaps_always_go_to_the_devices_own_ioas() {
    let shared = IdentityDomain::new(SHARED, Box::new(FakeRam::default()));
    let (mut a, _, own) = switch("a", OWN_A, &shared);
    a.use_identity(true).unwrap();
    a.map(0x1000, 0x3000, 0x1000, Perm::RW).unwrap();
    assert_eq!(*own.0.lock().unwrap(), vec![(0x1000, 0x1000)]);
    a.use_identity(false).unwrap();
    a.unmap(0x1000, 0x1000).unwrap();
    assert!(own.0.lock().unwrap().is_empty());
}

#[test]
fn a_refused_attach_to_the_shared_ioas_leaves_the_device_and_guest_ram_as_they_were() {
    let ram = FakeRam::default();
    let shared = IdentityDomain::new(SHARED, Box::new(ram.clone()));
    let (mut a, dev, _) = switch("0000:01:00.0", OWN_A, &shared);
    dev.refuse.store(true, Ordering::SeqCst);
    let e = a.use_identity(true).unwrap_err();
    assert_eq!(e.op, HostOp::UseIdentity(true));
    let text = e.to_string();
    assert!(text.contains("attaching 0000:01:00.0 to IOAS 7"), "{text}");
    assert!(
        !ram.mapped(),
        "nothing pinned for a device that is not there"
    );
    assert!(!shared.mapped());
}

#[test]
fn a_refused_attach_back_keeps_the_device_on_the_shared_ioas_with_guest_ram_mapped() {
    let ram = FakeRam::default();
    let shared = IdentityDomain::new(SHARED, Box::new(ram.clone()));
    let (mut a, dev, _) = switch("a", OWN_A, &shared);
    a.use_identity(true).unwrap();
    dev.refuse.store(true, Ordering::SeqCst);
    let e = a.use_identity(false).unwrap_err();
    assert_eq!(e.op, HostOp::UseIdentity(false));
    assert_eq!(dev.now(), Some(SHARED));
    assert!(ram.mapped(), "the device still reaches it");
    dev.refuse.store(false, Ordering::SeqCst);
    a.use_identity(false).unwrap();
    assert_eq!(dev.now(), Some(OWN_A));
    assert!(!ram.mapped());
}

#[test]
fn guest_ram_that_cannot_be_mapped_fails_the_switch_before_the_device_moves() {
    let ram = FakeRam::default();
    ram.refuse_maps();
    let shared = IdentityDomain::new(SHARED, Box::new(ram.clone()));
    let (mut a, dev, _) = switch("a", OWN_A, &shared);
    let e = a.use_identity(true).unwrap_err();
    assert!(
        e.to_string()
            .contains("mapping guest RAM in the shared identity IOAS 7"),
        "{e}"
    );
    assert_eq!(dev.now(), None, "never attached");
    assert!(!shared.mapped());
}

#[test]
fn a_hold_keeps_guest_ram_mapped_and_a_dropped_switch_lets_it_go() {
    let ram = FakeRam::default();
    let shared = IdentityDomain::new(SHARED, Box::new(ram.clone()));
    let (mut a, _, _) = switch("a", OWN_A, &shared);
    a.use_identity(true).unwrap();
    let hold = shared.hold().unwrap();
    drop(a);
    assert!(ram.mapped(), "held for the devices without a vIOMMU");
    drop(hold);
    assert!(!ram.mapped());
    assert_eq!((ram.maps(), ram.unmaps()), (1, 1));
}

#[test]
fn a_device_moves_onto_another_devices_ioas_and_back_and_maps_always_go_to_its_own() {
    let shared = IdentityDomain::new(SHARED, Box::new(FakeRam::default()));
    let (mut b, device, own) = switch("0000:00:05.1", OWN_B, &shared);
    assert_eq!(b.own_domain(), Some(OWN_B));
    assert!(b.use_domain(Some(OWN_A)).unwrap());
    assert_eq!(device.now(), Some(OWN_A));
    b.map(0x1000, 0x2000, 0x1000, Perm::RW).unwrap();
    assert_eq!(*own.0.lock().unwrap(), vec![(0x1000, 0x1000)]);
    // Already there: no attach.
    assert!(b.use_domain(Some(OWN_A)).unwrap());
    assert_eq!(device.attached.lock().unwrap().len(), 1);
    assert!(b.use_domain(None).unwrap());
    assert_eq!(device.now(), Some(OWN_B));
    assert!(!shared.mapped(), "the identity domain was never used");
}

#[test]
fn from_another_devices_ioas_to_the_identity_one_and_back_to_its_own() {
    let ram = FakeRam::default();
    let shared = IdentityDomain::new(SHARED, Box::new(ram.clone()));
    let (mut b, device, _) = switch("0000:00:05.1", OWN_B, &shared);
    b.use_domain(Some(OWN_A)).unwrap();
    b.use_identity(true).unwrap();
    assert_eq!(device.now(), Some(SHARED));
    assert!(ram.mapped());
    b.use_identity(false).unwrap();
    assert_eq!(device.now(), Some(OWN_B));
    assert!(!ram.mapped(), "released by its only user");
}

#[test]
fn a_refused_move_onto_another_ioas_names_it_and_leaves_the_device_where_it_was() {
    let shared = IdentityDomain::new(SHARED, Box::new(FakeRam::default()));
    let (mut b, device, _) = switch("0000:00:05.1", OWN_B, &shared);
    device.refuse.store(true, Ordering::SeqCst);
    let e = b.use_domain(Some(OWN_A)).unwrap_err();
    assert_eq!(e.op, HostOp::UseDomain(Some(OWN_A)));
    assert!(e.to_string().contains("0000:00:05.1"), "{e}");
    device.refuse.store(false, Ordering::SeqCst);
    assert!(
        b.use_domain(None).unwrap(),
        "still on its own: nothing to do"
    );
    assert!(device.attached.lock().unwrap().is_empty());
}
