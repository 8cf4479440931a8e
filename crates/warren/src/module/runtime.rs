//! The module runtime: running instances, their mailboxes and per-session lanes, and how one
//! call is executed (on the caller's task when it can, else on an instance's or a lane's task).
//! What a module author sees is in the parent module; nothing here is part of that API.

use super::*;
use crate::bus::{Bus, Call};
use parking_lot::RwLock;

/// One call as it travels to an instance.
pub struct Job {
    /// Handler name.
    pub handler: Box<str>,
    /// Caller's session snapshot.
    pub session: Option<Arc<Session>>,
    /// Request body.
    pub body: Bytes,
    /// When the caller stops waiting; the handler is cancelled then.
    pub deadline: Instant,
    /// Where the result goes; `None` for calls without reply.
    pub reply: Option<oneshot::Sender<Result<Bytes, CallError>>>,
}

/// A running instance of a module: its mailbox and its execution lanes.
pub(crate) struct Instance {
    pub(crate) info: Arc<InstanceInfo>,
    module: Module,
    mailbox: Mailbox,
}

enum Mailbox {
    Sequential(mpsc::Sender<Job>),
    Concurrent(Arc<Lanes>),
}

struct Lanes {
    module: Module,
    env: Env,
    tracker: tokio_util::task::TaskTracker,
    active: Mutex<HashMap<SessionId, VecDeque<Job>, foldhash::fast::RandomState>>,
    /// How many lanes `active` holds: while none, a caller running a handler on its own task
    /// need not look for its session's lane.
    busy: std::sync::atomic::AtomicUsize,
}

impl Instance {
    /// Start an instance: spawn its sequential worker, or prepare its concurrent lanes.
    pub(crate) fn start(
        module: Module,
        info: Arc<InstanceInfo>,
        services: Arc<dyn Services>,
        mailbox_size: usize,
        tracker: &tokio_util::task::TaskTracker,
    ) -> Arc<Instance> {
        let env = Env {
            services,
            instance: info.clone(),
        };
        let mailbox = match module.def.execution {
            Execution::Sequential => {
                let (tx, mut rx) = mpsc::channel::<Job>(mailbox_size.max(1));
                let m = module.clone();
                tracker.spawn(async move {
                    while let Some(job) = rx.recv().await {
                        execute(&m, &env, job).await;
                    }
                });
                Mailbox::Sequential(tx)
            }
            Execution::Concurrent => Mailbox::Concurrent(Arc::new(Lanes {
                module: module.clone(),
                env,
                tracker: tracker.clone(),
                active: Mutex::new(HashMap::default()),
                busy: Default::default(),
            })),
        };
        Arc::new(Instance {
            info,
            module,
            mailbox,
        })
    }

    /// Hand a job to the instance. Resolves once it is queued, so a caller that awaits each
    /// submission in turn keeps its order.
    pub(crate) async fn submit(&self, job: Job) -> Result<(), CallError> {
        match &self.mailbox {
            Mailbox::Sequential(tx) => tx.send(job).await.map_err(|_| CallError::Closed),
            Mailbox::Concurrent(lanes) => {
                Lanes::submit(lanes, job);
                Ok(())
            }
        }
    }

    pub(crate) fn env(&self, services: Arc<dyn Services>) -> Env {
        Env {
            services,
            instance: self.info.clone(),
        }
    }

    pub(crate) async fn init(&self, services: Arc<dyn Services>) -> Result<(), CallError> {
        match &self.module.def.on_init {
            Some(h) => h(self.env(services)).await,
            None => Ok(()),
        }
    }

    pub(crate) fn run(
        &self,
        services: Arc<dyn Services>,
        token: CancellationToken,
        tracker: &tokio_util::task::TaskTracker,
    ) {
        if let Some(h) = &self.module.def.on_run {
            tracker.spawn(h(self.env(services), token));
        }
    }

    pub(crate) async fn destroy(&self, services: Arc<dyn Services>) {
        if let Some(h) = &self.module.def.on_destroy
            && let Err(e) = h(self.env(services)).await
        {
            tracing::warn!(module = %self.info.module, error = %e, "module destroy failed");
        }
    }
}

impl Lanes {
    fn submit(this: &Arc<Lanes>, job: Job) {
        let Some(key) = job.session.as_ref().map(|s| s.id.clone()) else {
            let lanes = this.clone();
            this.tracker
                .spawn(async move { execute(&lanes.module, &lanes.env, job).await });
            return;
        };
        {
            let mut active = this.active.lock();
            if let Some(q) = active.get_mut(&key) {
                q.push_back(job);
                return;
            }
            active.insert(key.clone(), VecDeque::new());
            this.busy.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        Lanes::run(this.clone(), key, Some(job));
    }

    /// Run a session's lane on its own task: `first`, then whatever queued behind it, until the
    /// lane is empty (then the lane is gone).
    fn run(lanes: Arc<Lanes>, key: SessionId, first: Option<Job>) {
        let tracker = lanes.tracker.clone();
        tracker.spawn(async move {
            let mut job = first;
            loop {
                if let Some(job) = job.take() {
                    execute(&lanes.module, &lanes.env, job).await;
                }
                let mut active = lanes.active.lock();
                match active.get_mut(&key).and_then(VecDeque::pop_front) {
                    Some(next) => job = Some(next),
                    None => {
                        active.remove(&key);
                        lanes.busy.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                        break;
                    }
                }
            }
        });
    }

    /// A lane's current job finished on its caller's task: hand what queued behind it to a
    /// lane task, or close the lane.
    fn release(this: &Arc<Lanes>, key: SessionId) {
        let next = {
            let mut active = this.active.lock();
            match active.get_mut(&key) {
                Some(q) if !q.is_empty() => q.pop_front(),
                _ => {
                    if active.remove(&key).is_some() {
                        this.busy.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                    }
                    return;
                }
            }
        };
        Lanes::run(this.clone(), key, next);
    }
}

impl Instance {
    /// Call a handler from the caller's own task (the gate's connection task), the fast path of
    /// a request to an instance in this process.
    ///
    /// A concurrent instance whose lane for this session is idle runs the handler right here: it
    /// is polled once, and a handler that completes without waiting (most do) costs no task, no
    /// channel and no wake-up; its result comes back as [`Pending::Ready`]. A handler that waits
    /// moves, as it is, to a lane task of its own, and the caller gets a [`Pending::Local`].
    /// Everything else (a busy lane, a sequential instance) goes through the mailbox as
    /// [`Instance::submit`] does, so one session's calls still run one after another, in order.
    pub(crate) async fn call_here(
        &self,
        handler: &str,
        session: Option<Arc<Session>>,
        body: Bytes,
        started: Instant,
        deadline: Instant,
        reply: bool,
    ) -> Result<Option<Pending>, CallError> {
        let Mailbox::Concurrent(lanes) = &self.mailbox else {
            return self
                .submit_call(handler, session, body, deadline, reply)
                .await;
        };
        // the session's lane: looked for only while some lane runs (while none does, nothing of
        // this session can be running or queued); claimed only if the handler has to wait
        let mut key = session.as_ref().map(|s| s.id.clone());
        let mut claimed = false;
        if let Some(k) = &key
            && lanes.busy.load(std::sync::atomic::Ordering::Acquire) > 0
        {
            let busy = {
                let mut active = lanes.active.lock();
                if active.contains_key(k) {
                    true
                } else {
                    active.insert(k.clone(), VecDeque::new());
                    lanes.busy.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                    claimed = true;
                    false
                }
            };
            if busy {
                return self
                    .submit_call(handler, session, body, deadline, reply)
                    .await;
            }
        }
        let env = &lanes.env;
        let mut fut = match begin(
            &lanes.module,
            env,
            handler,
            session.clone(),
            body,
            deadline,
            started,
        ) {
            Ok(fut) => fut,
            Err(e) => {
                let result = Err(e);
                record(env, handler, started, &result);
                if let Some(k) = key.filter(|_| claimed) {
                    Lanes::release(lanes, k);
                }
                return Ok(settled(env, handler, result, reply));
            }
        };
        let polled = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::pin::Pin::new(&mut fut).poll(cx))
        })
        .await;
        match polled {
            std::task::Poll::Ready(caught) => {
                let result = caught_result(caught, env, handler, session.as_deref());
                record(env, handler, started, &result);
                if let Some(k) = key.filter(|_| claimed) {
                    Lanes::release(lanes, k);
                }
                Ok(settled(env, handler, result, reply))
            }
            std::task::Poll::Pending => {
                // it waits: from now on the session's later calls queue behind it
                if !claimed && let Some(k) = &key {
                    let mut active = lanes.active.lock();
                    if !active.contains_key(k) {
                        active.insert(k.clone(), VecDeque::new());
                        lanes.busy.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                        claimed = true;
                    }
                }
                if !claimed {
                    // a call made elsewhere with this session holds its lane: not ours to free
                    key = None;
                }
                let (tx, rx) = if reply {
                    let (tx, rx) = oneshot::channel();
                    (Some(tx), Some(rx))
                } else {
                    (None, None)
                };
                let lanes = lanes.clone();
                let handler: Box<str> = handler.into();
                lanes.tracker.clone().spawn(async move {
                    let env = &lanes.env;
                    let result = drive(fut, deadline, env, &handler, session.as_deref()).await;
                    record(env, &handler, started, &result);
                    deliver(env, &handler, result, tx);
                    if let Some(k) = key {
                        Lanes::release(&lanes, k);
                    }
                });
                Ok(rx.map(Pending::Local))
            }
        }
    }

    /// [`Instance::submit`] for a call given in parts, with its reply channel.
    async fn submit_call(
        &self,
        handler: &str,
        session: Option<Arc<Session>>,
        body: Bytes,
        deadline: Instant,
        reply: bool,
    ) -> Result<Option<Pending>, CallError> {
        let (tx, rx) = if reply {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        self.submit(Job {
            handler: handler.into(),
            session,
            body,
            deadline,
            reply: tx,
        })
        .await?;
        Ok(rx.map(Pending::Local))
    }
}

/// A handler's future, with panics caught.
type Running = futures_util::future::CatchUnwind<
    AssertUnwindSafe<BoxFuture<'static, Result<Bytes, CallError>>>,
>;

/// Start a handler: its future, or why it cannot run (no such handler, deadline already passed).
fn begin(
    module: &Module,
    env: &Env,
    handler: &str,
    session: Option<Arc<Session>>,
    body: Bytes,
    deadline: Instant,
    started: Instant,
) -> Result<Running, CallError> {
    match module.def.handlers.get(handler) {
        None => Err(CallError::HandlerNotFound(handler.to_owned())),
        Some(_) if started >= deadline => Err(CallError::Timeout),
        Some(h) => Ok(AssertUnwindSafe((h.f)(env.clone(), session, body)).catch_unwind()),
    }
}

/// A handler's outcome: its result, or a typed error (and one log line, one metric) if it
/// panicked.
fn caught_result(
    caught: Result<Result<Bytes, CallError>, Box<dyn std::any::Any + Send>>,
    env: &Env,
    handler: &str,
    session: Option<&Session>,
) -> Result<Bytes, CallError> {
    match caught {
        Ok(r) => r,
        Err(panic) => {
            let text = panic_text(&*panic);
            let peer = session.map(|s| s.remote.to_string()).unwrap_or_default();
            tracing::error!(%peer, module = %env.instance.module, handler = %handler, reason = %text, "handler panicked");
            metrics::counter!("warren_handler_panics_total").increment(1);
            Err(CallError::Panicked(text))
        }
    }
}

/// Run a started handler to its end, cancelling it at the deadline.
async fn drive(
    fut: Running,
    deadline: Instant,
    env: &Env,
    handler: &str,
    session: Option<&Session>,
) -> Result<Bytes, CallError> {
    match tokio::time::timeout_at(deadline, fut).await {
        Ok(caught) => caught_result(caught, env, handler, session),
        Err(_) => {
            let peer = session.map(|s| s.remote.to_string()).unwrap_or_default();
            tracing::warn!(%peer, module = %env.instance.module, handler = %handler, reason = "deadline passed", "handler cancelled");
            Err(CallError::Timeout)
        }
    }
}

/// Count one finished call.
fn record(_env: &Env, _handler: &str, started: Instant, result: &Result<Bytes, CallError>) {
    metrics::histogram!("warren_handler_duration_seconds").record(started.elapsed().as_secs_f64());
    if let Err(e) = result {
        metrics::counter!("warren_call_errors_total", "kind" => e.kind().as_str()).increment(1);
    }
}

/// A result computed on the caller's task, as the caller's [`Pending`] (or logged, for a call
/// without reply).
fn settled(
    env: &Env,
    handler: &str,
    result: Result<Bytes, CallError>,
    reply: bool,
) -> Option<Pending> {
    if reply {
        return Some(Pending::Ready(Some(result)));
    }
    if let Err(e) = result {
        tracing::debug!(module = %env.instance.module, handler = %handler, error = %e, "call without reply failed");
    }
    None
}

/// Send a result to whoever waits for it (or log it, for a call without reply).
fn deliver(
    env: &Env,
    handler: &str,
    result: Result<Bytes, CallError>,
    reply: Option<oneshot::Sender<Result<Bytes, CallError>>>,
) {
    match reply {
        Some(tx) => {
            let _ = tx.send(result);
        }
        None => {
            if let Err(e) = result {
                tracing::debug!(module = %env.instance.module, handler = %handler, error = %e, "call without reply failed");
            }
        }
    }
}

/// Run one job: find the handler, run it under its deadline, catch a panic, send the result.
async fn execute(module: &Module, env: &Env, job: Job) {
    let Job {
        handler,
        session,
        body,
        deadline,
        reply,
    } = job;
    let started = Instant::now();
    let result = match begin(
        module,
        env,
        &handler,
        session.clone(),
        body,
        deadline,
        started,
    ) {
        Err(e) => Err(e),
        Ok(fut) => drive(fut, deadline, env, &handler, session.as_deref()).await,
    };
    record(env, &handler, started, &result);
    deliver(env, &handler, result, reply);
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "handler panicked".to_owned()
    }
}

/// The in-process bus: a map from instance id to running instance. The router calls it directly
/// for instances on this node (no boxed future); it is also a [`Bus`] for tests and as the local
/// half of a remote bus.
#[derive(Default)]
pub struct LocalBus {
    instances: RwLock<HashMap<Arc<str>, Arc<Instance>, foldhash::fast::RandomState>>,
    /// Bumped when an instance comes or goes (see `Router::generation`).
    generation: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for LocalBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBus").finish_non_exhaustive()
    }
}

impl LocalBus {
    pub(crate) fn attach(&self, instance: Arc<Instance>) {
        let id = instance.info.id.clone();
        self.instances.write().insert(id, instance);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// Changes whenever an instance comes or goes.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Drop every instance (at shutdown), which closes sequential mailboxes.
    pub(crate) fn clear(&self) {
        self.instances.write().clear();
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// The id of an instance of module type `module` on this node, if one runs here (the one
    /// that takes the calls of the type's queue group).
    pub fn instance_of(&self, module: &str) -> Option<Arc<str>> {
        let instances = self.instances.read();
        instances
            .iter()
            .filter(|(_, i)| &*i.info.module == module)
            .map(|(id, _)| id)
            .min()
            .cloned()
    }

    /// The running instance `id`, if it is on this node.
    pub(crate) fn get(&self, id: &str) -> Option<Arc<Instance>> {
        self.instances.read().get(id).cloned()
    }

    /// Deliver a call to a local instance.
    pub async fn deliver(&self, call: Call, reply: bool) -> Result<Option<Pending>, CallError> {
        let instance = self
            .instances
            .read()
            .get(&call.instance)
            .cloned()
            .ok_or(CallError::Closed)?;
        let (tx, rx) = if reply {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        instance
            .submit(Job {
                handler: call.handler,
                session: call.session,
                body: call.body,
                deadline: call.deadline,
                reply: tx,
            })
            .await?;
        Ok(rx.map(Pending::Local))
    }
}

impl Bus for LocalBus {
    fn send(
        &self,
        _node: &str,
        call: Call,
        reply: bool,
    ) -> BoxFuture<'_, Result<Option<Pending>, CallError>> {
        Box::pin(self.deliver(call, reply))
    }

    fn kind(&self) -> &'static str {
        "local"
    }
}
