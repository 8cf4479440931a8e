//! The module runtime: running instances, their mailboxes and per-session lanes, and how one
//! call is executed (on the caller's task when it can, else on an instance's or a lane's task).
//! What a module author sees is in the parent module; nothing here is part of that API.

use super::*;
use crate::bus::{Bus, Call};
use crate::trace::TraceContext;
use parking_lot::RwLock;
use route_metrics::RouteStats;

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
    /// The client request this call serves, when traced: the handler runs in its span.
    pub trace: Option<TraceContext>,
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

    /// Jobs waiting for this instance now: in its sequential mailbox, or behind the running
    /// job of each session's lane (read from the channel and the lanes, nothing counted).
    fn queue_depth(&self) -> usize {
        match &self.mailbox {
            Mailbox::Sequential(tx) => tx.max_capacity() - tx.capacity(),
            Mailbox::Concurrent(lanes) => lanes.active.lock().values().map(VecDeque::len).sum(),
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
                    match (&lanes.module.def.in_order, lanes.queued_run(&key, &job)) {
                        (Some(runner), Some(rest)) => {
                            execute_in_order(&lanes.module, &lanes.env, runner, job, rest).await;
                        }
                        _ => execute(&lanes.module, &lanes.env, job).await,
                    }
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

    /// For a module with an in-order runner: the calls queued behind `first` that may go to the
    /// runner with it (none, or `first` itself a session-closed notification, means `None`).
    fn queued_run(&self, key: &SessionId, first: &Job) -> Option<Vec<Job>> {
        self.module.def.in_order.as_ref()?;
        if &*first.handler == SESSION_CLOSED {
            return None;
        }
        let mut active = self.active.lock();
        let q = active.get_mut(key)?;
        let n = q
            .iter()
            .take(IN_ORDER_RUN - 1)
            .take_while(|j| &*j.handler != SESSION_CLOSED)
            .count();
        if n == 0 {
            return None;
        }
        Some(q.drain(..n).collect())
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
    ///
    /// When a call ends here and its duration was measured, `ended` gets the clock reading it
    /// was measured with: the gate starts its next request from it instead of reading the
    /// clock again.
    #[allow(clippy::too_many_arguments)] // the parts of a call, as the gate holds them
    pub(crate) async fn call_here(
        &self,
        handler: &str,
        session: Option<Arc<Session>>,
        body: Bytes,
        started: Instant,
        deadline: Instant,
        reply: bool,
        trace: Option<TraceContext>,
        ended: &mut Option<Instant>,
    ) -> Result<Option<Pending>, CallError> {
        let Mailbox::Concurrent(lanes) = &self.mailbox else {
            return self
                .submit_call(handler, session, body, deadline, reply, trace)
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
                    .submit_call(handler, session, body, deadline, reply, trace)
                    .await;
            }
        }
        let env = &lanes.env;
        let (route, began) = begin(
            &lanes.module,
            env,
            handler,
            session.clone(),
            body,
            deadline,
            started,
            trace.as_ref(),
        );
        let mut fut = match began {
            Ok(fut) => fut,
            Err(e) => {
                let result = Err(e);
                *ended = record(route, started, &result);
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
                *ended = record(route, started, &result);
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
                let route = route.cloned();
                let lanes = lanes.clone();
                let handler: Box<str> = handler.into();
                lanes.tracker.clone().spawn(async move {
                    let env = &lanes.env;
                    let result = drive(fut, deadline, env, &handler, session.as_deref()).await;
                    record(route.as_ref(), started, &result);
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
        trace: Option<TraceContext>,
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
            trace,
        })
        .await?;
        Ok(rx.map(Pending::Local))
    }
}

/// A handler's future, with panics caught.
type Running = futures_util::future::CatchUnwind<
    AssertUnwindSafe<BoxFuture<'static, Result<Bytes, CallError>>>,
>;

/// Start a handler: its future, or why it cannot run (no such handler, deadline already passed);
/// and the route counts the call goes to ([`record`]), found in the same lookup.
#[allow(clippy::too_many_arguments)] // the parts of a call, as the callers hold them
fn begin<'m>(
    module: &'m Module,
    env: &Env,
    handler: &str,
    session: Option<Arc<Session>>,
    body: Bytes,
    deadline: Instant,
    started: Instant,
    trace: Option<&TraceContext>,
) -> (Option<&'m Arc<RouteStats>>, Result<Running, CallError>) {
    match module.def.handlers.get(handler) {
        None => (
            other_route(module, handler),
            Err(CallError::HandlerNotFound(handler.to_owned())),
        ),
        Some(h) if started >= deadline => (h.route.as_ref(), Err(CallError::Timeout)),
        Some(h) => {
            let fut = traced((h.f)(env.clone(), session, body), trace, env, handler);
            (h.route.as_ref(), Ok(AssertUnwindSafe(fut).catch_unwind()))
        }
    }
}

/// A handler's future run in the trace of the request it serves (crate::trace): the calls it
/// makes carry the trace on, and, while the request's span is on, its log lines carry the trace
/// id. As it is for an untraced call (the usual case in a process that logs no traces: no cost).
fn traced(
    fut: BoxFuture<'static, Result<Bytes, CallError>>,
    trace: Option<&TraceContext>,
    env: &Env,
    handler: &str,
) -> BoxFuture<'static, Result<Bytes, CallError>> {
    let Some(t) = trace else {
        return fut;
    };
    let (span, inner) = crate::trace::call_span(t, &env.instance.module, handler);
    let fut = crate::trace::in_trace(inner, fut);
    if span.is_disabled() {
        return Box::pin(fut);
    }
    span.in_scope(|| tracing::debug!(target: "warren::trace", "handler starts"));
    Box::pin(tracing::Instrument::instrument(fut, span))
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

/// Count one finished call: under its route's counts (`route`, from [`begin`] or the handler's
/// entry; none for an internal handler) and, when it failed, by kind. Answers the clock reading
/// its duration was taken with, if it took one.
#[inline]
fn record(
    route: Option<&Arc<RouteStats>>,
    started: Instant,
    result: &Result<Bytes, CallError>,
) -> Option<Instant> {
    if let Err(e) = result {
        metrics::counter!("warren_call_errors_total", "kind" => e.kind().as_str()).increment(1);
    }
    let route = route?;
    if !route_metrics::enabled() {
        return None;
    }
    let now = Instant::now();
    route.record(now.saturating_duration_since(started), result);
    Some(now)
}

/// The counts a call of `handler`, a name module `module` does not have, goes to: its `other`
/// route, or none for an internal name (`$…`, not a request).
fn other_route<'m>(module: &'m Module, handler: &str) -> Option<&'m Arc<RouteStats>> {
    if handler.starts_with('$') {
        return None;
    }
    module.def.routes.as_ref().map(|r| r.other())
}

/// A result computed on the caller's task, as the caller's [`Pending`] (or logged, for a call
/// without reply).
#[inline]
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
        trace,
    } = job;
    let started = Instant::now();
    let (route, began) = begin(
        module,
        env,
        &handler,
        session.clone(),
        body,
        deadline,
        started,
        trace.as_ref(),
    );
    let result = match began {
        Err(e) => Err(e),
        Ok(fut) => drive(fut, deadline, env, &handler, session.as_deref()).await,
    };
    record(route, started, &result);
    deliver(env, &handler, result, reply);
}

/// Run a session's queued calls through the module's in-order runner
/// ([`ModuleBuilder::in_order`]): the calls that can start go to the runner together, then each
/// result is awaited in order under its own deadline, counted and sent back.
async fn execute_in_order(
    module: &Module,
    env: &Env,
    runner: &InOrderRunner,
    first: Job,
    rest: Vec<Job>,
) {
    let started = Instant::now();
    let mut calls = Vec::with_capacity(rest.len() + 1);
    let mut waiting = Vec::with_capacity(rest.len() + 1);
    for job in std::iter::once(first).chain(rest) {
        let Job {
            handler,
            session,
            body,
            deadline,
            reply,
            trace,
        } = job;
        let (route, refused) = match module.def.handlers.get(&*handler) {
            None => (
                other_route(module, &handler),
                Some(CallError::HandlerNotFound(handler.to_string())),
            ),
            Some(h) if started >= deadline => (h.route.as_ref(), Some(CallError::Timeout)),
            Some(h) => (h.route.as_ref(), None),
        };
        if let Some(e) = refused {
            let result = Err(e);
            record(route, started, &result);
            deliver(env, &handler, result, reply);
            continue;
        }
        calls.push((handler.clone(), session.clone(), body));
        waiting.push((handler, route, session, deadline, reply, trace));
    }
    if calls.is_empty() {
        return;
    }
    let mut futures = runner(env.clone(), calls).into_iter();
    for (handler, route, session, deadline, reply, trace) in waiting {
        let result = match futures.next() {
            Some(fut) => {
                let fut = traced(fut, trace.as_ref(), env, &handler);
                let fut: Running = AssertUnwindSafe(fut).catch_unwind();
                drive(fut, deadline, env, &handler, session.as_deref()).await
            }
            None => Err(CallError::Closed),
        };
        record(route, started, &result);
        deliver(env, &handler, result, reply);
    }
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

    /// Jobs waiting in the mailboxes of this node's instances, summed per module type, sorted
    /// by type (the `warren_module_queue_depth` gauge, read at scrape time).
    pub fn queue_depths(&self) -> Vec<(Arc<str>, usize)> {
        let mut by_module: std::collections::BTreeMap<Arc<str>, usize> = Default::default();
        for i in self.instances.read().values() {
            *by_module.entry(i.info.module.clone()).or_default() += i.queue_depth();
        }
        by_module.into_iter().collect()
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
                trace: call.trace,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Services for an instance that asks nothing of its node.
    struct NoServices;

    impl Services for NoServices {
        fn call<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            _: Option<Arc<Session>>,
            _: Bytes,
            _: Option<Duration>,
        ) -> BoxFuture<'a, Result<Bytes, CallError>> {
            Box::pin(std::future::ready(Err(CallError::Closed)))
        }
        fn call_nr<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            _: Option<Arc<Session>>,
            _: Bytes,
        ) -> BoxFuture<'a, Result<(), CallError>> {
            Box::pin(std::future::ready(Err(CallError::Closed)))
        }
        fn push<'a>(
            &'a self,
            _: &'a Session,
            _: &'a str,
            _: Bytes,
        ) -> BoxFuture<'a, Result<(), CallError>> {
            Box::pin(std::future::ready(Ok(())))
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    }

    /// A module whose in-order runner records each run's handlers and answers each call with
    /// its body, and whose plain handler path is marked so the two can be told apart.
    fn recording() -> (Module, Arc<Mutex<Vec<Vec<String>>>>) {
        let runs: Arc<Mutex<Vec<Vec<String>>>> = Default::default();
        let seen = runs.clone();
        let module = Module::builder("Rec", ())
            .handler("Echo", |_: Context<()>, body: Bytes| async move {
                let mut v = b"plain:".to_vec();
                v.extend_from_slice(&body);
                Ok::<_, CallError>(Bytes::from(v))
            })
            .on_session_closed(|_: Context<()>, _: Bytes| async { Ok::<_, CallError>(()) })
            .in_order(move |calls: Vec<(Context<()>, Box<str>, Bytes)>| {
                seen.lock()
                    .push(calls.iter().map(|(_, h, _)| h.to_string()).collect());
                calls
                    .into_iter()
                    .map(|(_, _, body)| {
                        Box::pin(std::future::ready(Ok(body)))
                            as BoxFuture<'static, Result<Bytes, CallError>>
                    })
                    .collect()
            })
            .build();
        (module, runs)
    }

    fn job(
        handler: &str,
        session: &Arc<Session>,
        body: &str,
    ) -> (Job, oneshot::Receiver<Result<Bytes, CallError>>) {
        let (tx, rx) = oneshot::channel();
        let job = Job {
            handler: handler.into(),
            session: Some(session.clone()),
            body: Bytes::copy_from_slice(body.as_bytes()),
            deadline: Instant::now() + Duration::from_secs(5),
            reply: Some(tx),
            trace: None,
        };
        (job, rx)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_sessions_queued_calls_go_to_the_in_order_runner_together_and_in_order() {
        let (module, runs) = recording();
        let info = Arc::new(InstanceInfo {
            module: "Rec".into(),
            id: "Rec001".into(),
            settings: Value::Null,
        });
        let tracker = tokio_util::task::TaskTracker::new();
        let instance = Instance::start(module, info, Arc::new(NoServices), 16, &tracker);
        let (handle, _rx) = crate::session::test_handle("s1", 4);
        let session = handle.snapshot();

        // queued before the lane's task first runs: one run, in the client's order; a handler
        // the module lacks is refused without reaching the runner; a session-closed
        // notification ends the run and goes its own way
        let mut replies = Vec::new();
        for (handler, body) in [
            ("Echo", "1"),
            ("Echo", "2"),
            ("Nope", "x"),
            ("Echo", "3"),
            (crate::module::SESSION_CLOSED, ""),
            ("Echo", "4"),
        ] {
            let (j, rx) = job(handler, &session, body);
            instance.submit(j).await.expect("queued");
            replies.push(rx);
        }
        let mut got = Vec::new();
        for rx in replies {
            got.push(match rx.await.expect("a reply") {
                Ok(b) => String::from_utf8_lossy(&b).into_owned(),
                Err(e) => format!("error: {}", e.kind().as_str()),
            });
        }
        assert_eq!(got[0], "1");
        assert_eq!(got[1], "2");
        assert!(got[2].starts_with("error: "), "{}", got[2]);
        assert_eq!(got[3], "3");
        assert_eq!(got[5], "plain:4", "a lone call runs the plain way");
        assert_eq!(
            *runs.lock(),
            vec![vec!["Echo".to_string(), "Echo".into(), "Echo".into()]]
        );
    }
}
