//! A standby VMM: the KVM VM (memory slots, TSS, irqchip, PIT, vCPUs) created ahead of
//! demand, waiting on its API socket for `{"op":"restore","dir":...}`; then the snapshot's
//! memory file is mapped over the standby's guest RAM at the same addresses (MAP_FIXED |
//! MAP_PRIVATE: the memory slots stay valid, KVM's MMU notifier follows the new pages), the
//! devices and vCPU state come back and the guest continues.
//!
//! Why: everything a VM set-up waits on in the host kernel (SRCU grace periods behind memory
//! slot changes, on VMX also the APIC-access page slot that vCPU creation adds after the
//! irqchip) and process start are paid before the request arrives, not after.
//!
//! A standby VM is for one restore of a snapshot with the same guest RAM layout and vCPU
//! count (and an in-kernel irqchip, as every fnvm VM has). A request that does not fit is
//! refused and the standby keeps waiting; one that fails half-way ends the process.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;

use crate::api::{decode_request, encode_response, Request, Response, MAX_LINE};
use crate::error::{RestoreError, VmError};
use crate::memory::{self, GuestMemory};
use crate::persist::{virtio_backing, RestoreConfig};
use crate::snapshot::format::HostIdentity;
use crate::snapshot::{self, Loaded};
use crate::vmm::{validate_vcpus, Vm};
use crate::vstate::vm::KvmVm;

/// How long a client connection may stay silent before the standby VMM drops it.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// A VM created ahead of demand, waiting to become a snapshot's VM.
pub struct Standby {
    kvm_vm: KvmVm,
    /// Guest RAM as created (anonymous, never touched): the snapshot's memory file is mapped
    /// over it, and the restored VM keeps it as the owner of those addresses.
    mem: GuestMemory,
    vcpus: u8,
    /// This host as snapshot headers describe it, read ahead like the rest (CPUID traps to
    /// the hypervisor on a nested host: ~6 µs each there).
    here: HostIdentity,
}

impl Standby {
    /// Creates the VM: `memory_mib` of guest RAM, `vcpus` vCPUs, in-kernel irqchip and PIT.
    pub fn new(memory_mib: u64, vcpus: u8) -> Result<Self, VmError> {
        validate_vcpus(vcpus)?;
        let mem = memory::create_guest_memory(memory_mib)?;
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let here = snapshot::host_identity(&kvm)?;
        let kvm_vm = KvmVm::create(kvm, &mem, true, vcpus)?;
        Ok(Self {
            kvm_vm,
            mem,
            vcpus,
            here,
        })
    }

    /// Reads and checks the snapshot in `dir` for this VM (format, host, checksums, RAM
    /// layout, vCPU count) and the disks given for it (every writable disk has its own copy,
    /// every given file exists), and that the passt socket `net`, if given, exists. Nothing
    /// changes on error: the standby can take another request.
    pub fn check(
        &self,
        dir: &Path,
        disks: &HashMap<usize, PathBuf>,
        net: Option<&Path>,
    ) -> Result<Loaded, VmError> {
        let loaded = snapshot::load(dir, &self.here)?;
        let state = &loaded.state;
        if !state.irqchip {
            return Err(RestoreError::NoIrqchip.into());
        }
        if state.vcpus.len() != self.vcpus as usize {
            return Err(RestoreError::VcpuCount {
                snapshot: state.vcpus.len(),
                standby: self.vcpus,
            }
            .into());
        }
        snapshot::memory::layout_matches(&state.regions, &self.mem).map_err(RestoreError::from)?;
        virtio_backing(state, dir, disks, None, None)?;
        for path in disks.values() {
            std::fs::metadata(path).map_err(|source| RestoreError::Disk {
                path: path.clone(),
                source,
            })?;
        }
        if let Some(path) = net {
            std::fs::metadata(path).map_err(|source| RestoreError::NetSocket {
                path: path.to_path_buf(),
                source,
            })?;
        }
        Ok(loaded)
    }

    /// Becomes the VM of a snapshot that passed [`Standby::check`].
    pub fn restore(self, loaded: &Loaded, config: RestoreConfig) -> Result<Vm, VmError> {
        // SAFETY: the standby VM never ran and nothing else refers to its RAM; `self.mem`
        // goes into the restored Vm as the owner of the overlaid addresses, which outlives
        // every user of the returned view (it is the Vm's last field).
        let mem = unsafe {
            snapshot::memory::map_private_over(
                &loaded.memory_path(),
                &loaded.state.regions,
                &self.mem,
            )
        }
        .map_err(|source| VmError::Io {
            what: "mapping the snapshot memory file over the standby VM's RAM",
            source,
        })?;
        Vm::finish_restore(self.kvm_vm, mem, Some(self.mem), loaded, config)
    }
}

/// The console a restored VM gets.
pub struct Console {
    pub output: Box<dyn Write + Send>,
    pub input: Option<RawFd>,
}

/// Serves `listener` until a `restore` request succeeds and returns the restored VM (its
/// vCPUs not yet running: call [`Vm::run`]). Restore metrics count from the moment the
/// request was read. Each request gets one JSON reply line; after a successful restore the
/// reply is `{"ok":true,"restore_ms":X}` and that connection closes (further API requests
/// use new connections, served by the running VM). Other ops are refused while in standby.
/// A restore that fails half-way (the VM is no longer usable) is an error.
pub fn serve_until_restore(
    mut standby: Standby,
    listener: &UnixListener,
    console: Console,
) -> Result<Vm, VmError> {
    let mut console = Some(console);
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(VmError::Io {
                    what: "accepting on the API socket",
                    source,
                })
            }
        };
        match serve_connection(standby, &stream, &mut console) {
            Outcome::Restored(vm) => return Ok(*vm),
            Outcome::Waiting(s) => standby = s,
            Outcome::Failed(e) => return Err(e),
        }
    }
}

enum Outcome {
    Restored(Box<Vm>),
    Waiting(Standby),
    Failed(VmError),
}

fn reply(mut stream: &UnixStream, response: &Response) {
    let out = encode_response(response);
    // A client that went away loses its reply; the standby goes on.
    let _ = stream.write_all(&out);
}

fn serve_connection(
    standby: Standby,
    stream: &UnixStream,
    console: &mut Option<Console>,
) -> Outcome {
    let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        match (&mut reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return Outcome::Waiting(standby),
            Ok(_) if !line.ends_with(b"\n") => {
                reply(
                    stream,
                    &Response::err("request line too long or unterminated"),
                );
                return Outcome::Waiting(standby);
            }
            Ok(_) => {}
        }
        let since = Instant::now();
        let (dir, disks, vsock, net, jail) = match decode_request(&line) {
            None => continue,
            Some(Ok(Request::Restore {
                dir,
                disks,
                vsock,
                net,
                jail,
            })) => (dir, disks, vsock, net, jail),
            Some(Ok(_)) => {
                reply(
                    stream,
                    &Response::err("this fnvm-vmm is in standby: the only op is restore"),
                );
                continue;
            }
            Some(Err(e)) => {
                reply(
                    stream,
                    &Response::err(format!(
                        "{e} (in standby: \
                         {{\"op\":\"restore\",\"dir\":...,\"disks\":[...],\"vsock\":...,\
                         \"net\":...}})"
                    )),
                );
                continue;
            }
        };
        if let Err(e) = crate::confine::Jail::new(&jail) {
            reply(stream, &Response::err(e));
            continue;
        }
        let disks: HashMap<usize, PathBuf> = disks.into_iter().enumerate().collect();
        let loaded = match standby.check(&dir, &disks, net.as_deref()) {
            Ok(l) => l,
            Err(e) => {
                reply(stream, &Response::err(e));
                continue;
            }
        };
        let Some(console) = console.take() else {
            return Outcome::Failed(RestoreError::ConsoleTaken.into());
        };
        let config = RestoreConfig {
            dir,
            console: console.output,
            console_input: console.input,
            disks,
            vsock,
            net,
            since,
        };
        return match standby.restore(&loaded, config) {
            Ok(mut vm) => {
                vm.jail_dirs = jail;
                reply(
                    stream,
                    &Response {
                        restore_ms: Some(since.elapsed().as_secs_f64() * 1000.0),
                        ..Response::ok()
                    },
                );
                Outcome::Restored(Box::new(vm))
            }
            Err(e) => {
                reply(stream, &Response::err(&e));
                Outcome::Failed(e)
            }
        };
    }
}
