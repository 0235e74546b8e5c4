//! The shim v2 task service containerd talks to (ttrpc, through the `containerd-shim` crate):
//! one shim process per container (grouped by the container's id), each RPC mapped onto that
//! [`Container`]. What fnvm does not do (exec, pause, checkpoint, a terminal, update) fails
//! with "… is not supported by fnvm" instead of the protocol's bare "not implemented".

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use containerd_shim::protos::events::task::{TaskCreate, TaskDelete, TaskExit, TaskOOM, TaskStart};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{EnumOrUnknown, MessageDyn, MessageField};
use containerd_shim::protos::shim::shim::{
    CheckpointTaskRequest, CloseIORequest, ExecProcessRequest, PauseRequest, ResizePtyRequest,
    ResumeRequest, StatsRequest, StatsResponse, UpdateTaskRequest,
};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::protos::types::task::{ProcessInfo, Status};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{api, Context, DeleteResponse, ExitSignal, Flags, TtrpcContext, TtrpcResult};

use crate::container::{Container, Exit};

/// The runtime's name, as containerd knows it.
pub const RUNTIME_ID: &str = "io.containerd.fnvm.v2";

/// The shim: `start` and `delete` as one-shot commands, then the task service.
#[derive(Clone)]
pub struct Service {
    namespace: String,
    exit: Arc<ExitSignal>,
    container: Arc<Mutex<Option<Arc<Container>>>>,
    publisher: Arc<Mutex<Option<RemotePublisher>>>,
}

impl containerd_shim::Shim for Service {
    type T = Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut containerd_shim::Config) -> Self {
        Service {
            namespace: args.namespace.clone(),
            exit: Arc::new(ExitSignal::default()),
            container: Arc::default(),
            publisher: Arc::default(),
        }
    }

    fn start_shim(&mut self, opts: containerd_shim::StartOpts) -> containerd_shim::Result<String> {
        let grouping = opts.id.clone();
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        containerd_shim::util::write_address(&address)?;
        Ok(address)
    }

    /// containerd's clean-up after a shim that died (run in the bundle): the bundle's rootfs
    /// unmounted, and what the dead shim's instances left (sandbox processes, cgroups, loop
    /// devices, files) removed as fnvm removes a crashed fnvm's.
    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        if let Ok(dir) = std::env::current_dir() {
            let rootfs = dir.join("rootfs");
            while nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH).is_ok() {}
        }
        match crate::container::home().map(|home| fnvm::sandbox::cleanup_orphans(&home)) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("cleaning up after the dead shim: {e}"),
            Err(e) => tracing::warn!("cleaning up after the dead shim: {e}"),
        }
        let mut response = DeleteResponse::new();
        response.exit_status = 128 + libc::SIGKILL as u32;
        response.exited_at = MessageField::some(timestamp(SystemTime::now()));
        Ok(response)
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        *self.publisher.lock().unwrap_or_else(|p| p.into_inner()) = Some(publisher);
        self.clone()
    }
}

impl Service {
    fn container(&self, id: &str) -> TtrpcResult<Arc<Container>> {
        let container = self.container.lock().unwrap_or_else(|p| p.into_inner());
        match container.as_ref() {
            Some(c) if c.id == id => Ok(Arc::clone(c)),
            _ => Err(error(Code::NOT_FOUND, format!("container {id} not found"))),
        }
    }

    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        publish(&self.publisher, &self.namespace, topic, event);
    }
}

fn publish(
    publisher: &Mutex<Option<RemotePublisher>>,
    namespace: &str,
    topic: &str,
    event: Box<dyn MessageDyn>,
) {
    let publisher = publisher.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = publisher.as_ref() {
        if let Err(e) = p.publish(Context::default(), topic, namespace, event) {
            tracing::warn!("cannot publish {topic} to containerd: {e}");
        }
    }
}

fn error(code: Code, message: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
}

fn unsupported(what: &str) -> ttrpc::Error {
    error(
        Code::UNIMPLEMENTED,
        format!(
            "{what} is not supported by fnvm: a container runs one function, reached on port 9000"
        ),
    )
}

fn timestamp(at: SystemTime) -> Timestamp {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = since.as_secs() as i64;
    ts.nanos = since.subsec_nanos() as i32;
    ts
}

fn exec_refused(exec_id: &str) -> TtrpcResult<()> {
    if exec_id.is_empty() {
        Ok(())
    } else {
        Err(unsupported("an exec process"))
    }
}

impl containerd_shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        if !req.checkpoint.is_empty() {
            return Err(unsupported("restoring a checkpoint"));
        }
        let mounts: Vec<(String, String, Vec<String>)> = req
            .rootfs
            .iter()
            .map(|m| (m.type_.clone(), m.source.clone(), m.options.clone()))
            .collect();
        let container = Container::create(
            &req.id,
            Path::new(&req.bundle),
            &mounts,
            req.terminal,
            [&req.stdin, &req.stdout, &req.stderr],
        )
        .map_err(|e| error(Code::FAILED_PRECONDITION, e))?;
        *self.container.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(container));
        let mut event = TaskCreate::new();
        event.container_id = req.id.clone();
        event.bundle = req.bundle.clone();
        event.rootfs = req.rootfs.clone();
        self.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(event));
        Ok(api::CreateTaskResponse::new())
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        exec_refused(&req.exec_id)?;
        let container = self.container(&req.id)?;
        let publisher = Arc::clone(&self.publisher);
        let namespace = self.namespace.clone();
        let pid = container
            .start(move |c: &Container, exit: Exit| {
                if exit.oom {
                    let mut event = TaskOOM::new();
                    event.container_id = c.id.clone();
                    publish(
                        &publisher,
                        &namespace,
                        topics::TASK_OOM_EVENT_TOPIC,
                        Box::new(event),
                    );
                }
                let mut event = TaskExit::new();
                event.container_id = c.id.clone();
                event.id = c.id.clone();
                event.pid = c.state().pid;
                event.exit_status = exit.status;
                event.exited_at = MessageField::some(timestamp(exit.at));
                publish(
                    &publisher,
                    &namespace,
                    topics::TASK_EXIT_EVENT_TOPIC,
                    Box::new(event),
                );
            })
            .map_err(|e| error(Code::FAILED_PRECONDITION, e))?;
        let mut event = TaskStart::new();
        event.container_id = req.id.clone();
        event.pid = pid;
        self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(event));
        let mut response = api::StartResponse::new();
        response.pid = pid;
        Ok(response)
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        exec_refused(&req.exec_id)?;
        let container = self.container(&req.id)?;
        let state = container.state();
        let mut response = api::StateResponse::new();
        response.id = container.id.clone();
        response.bundle = container.bundle.display().to_string();
        response.pid = state.pid;
        response.status = EnumOrUnknown::new(match state.phase {
            "created" => Status::CREATED,
            "running" => Status::RUNNING,
            _ => Status::STOPPED,
        });
        response.stdout = container.stdout.clone();
        response.stderr = container.stderr.clone();
        if let Some(exit) = state.exit {
            response.exit_status = exit.status;
            response.exited_at = MessageField::some(timestamp(exit.at));
        }
        Ok(response)
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        exec_refused(&req.exec_id)?;
        let container = self.container(&req.id)?;
        container
            .kill(req.signal)
            .map_err(|e| error(Code::FAILED_PRECONDITION, e))?;
        Ok(api::Empty::new())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        exec_refused(&req.exec_id)?;
        let container = self.container(&req.id)?;
        let exit = container.wait();
        let mut response = api::WaitResponse::new();
        response.exit_status = exit.status;
        response.exited_at = MessageField::some(timestamp(exit.at));
        Ok(response)
    }

    fn delete(&self, _ctx: &TtrpcContext, req: api::DeleteRequest) -> TtrpcResult<DeleteResponse> {
        exec_refused(&req.exec_id)?;
        let container = self.container(&req.id)?;
        let exit = container.delete();
        let pid = container.state().pid;
        *self.container.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let mut event = TaskDelete::new();
        event.container_id = req.id.clone();
        event.id = req.id.clone();
        event.pid = pid;
        event.exit_status = exit.status;
        event.exited_at = MessageField::some(timestamp(exit.at));
        self.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(event));
        let mut response = DeleteResponse::new();
        response.pid = pid;
        response.exit_status = exit.status;
        response.exited_at = MessageField::some(timestamp(exit.at));
        Ok(response)
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let container = self.container(&req.id)?;
        let mut response = api::PidsResponse::new();
        let state = container.state();
        if state.phase == "running" && state.pid != 0 {
            let mut process = ProcessInfo::new();
            process.pid = state.pid;
            response.processes.push(process);
        }
        Ok(response)
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let mut response = api::ConnectResponse::new();
        response.shim_pid = std::process::id();
        response.version = env!("CARGO_PKG_VERSION").to_string();
        if let Ok(container) = self.container(&req.id) {
            response.task_pid = container.state().pid;
        }
        Ok(response)
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        let busy = self
            .container
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        if !busy {
            self.exit.signal();
        }
        Ok(api::Empty::new())
    }

    fn exec(&self, _ctx: &TtrpcContext, _req: ExecProcessRequest) -> TtrpcResult<api::Empty> {
        Err(unsupported("exec"))
    }

    fn pause(&self, _ctx: &TtrpcContext, _req: PauseRequest) -> TtrpcResult<api::Empty> {
        Err(unsupported("pause"))
    }

    fn resume(&self, _ctx: &TtrpcContext, _req: ResumeRequest) -> TtrpcResult<api::Empty> {
        Err(unsupported("resume"))
    }

    fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(unsupported("checkpoint"))
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, _req: ResizePtyRequest) -> TtrpcResult<api::Empty> {
        Err(unsupported("a terminal"))
    }

    fn close_io(&self, _ctx: &TtrpcContext, _req: CloseIORequest) -> TtrpcResult<api::Empty> {
        // The function has no stdin to close; containerd sends this after its input ends.
        Ok(api::Empty::new())
    }

    fn update(&self, _ctx: &TtrpcContext, _req: UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        Err(unsupported("updating a running function's resources"))
    }

    /// The sandbox's cgroup counters (memory, CPU, pids: the agent's cgroup holds the function,
    /// a VMM's holds its VM), in the cgroup v1 metrics containerd decodes (`ctr task metrics`).
    fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let container = self.container(&req.id)?;
        let state = container.state();
        if state.phase != "running" || state.pid == 0 || state.pid == std::process::id() {
            return Err(error(
                Code::FAILED_PRECONDITION,
                format!("container {} has no running function to measure", req.id),
            ));
        }
        let metrics = containerd_shim::cgroup::collect_metrics(state.pid).map_err(|e| {
            error(
                Code::INTERNAL,
                format!("cannot read the function's cgroup: {e}"),
            )
        })?;
        let mut response = StatsResponse::new();
        response.stats = MessageField::some(
            containerd_shim::util::convert_to_any(Box::new(metrics))
                .map_err(|e| error(Code::INTERNAL, e))?,
        );
        Ok(response)
    }
}
