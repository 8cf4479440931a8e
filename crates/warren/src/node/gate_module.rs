//! The gate's own RPC module (`Gate`): how another node edits, pushes to or closes a session
//! this node's gate holds.

use super::*;

/// Module type of the gate's session operations.
pub(crate) const GATE: &str = crate::gate::GATE_MODULE;

/// The `Gate` module: session operations as RPC handlers, so modules on other nodes (and mqant
/// peers) can reach sessions on this gate (docs/protocols/mqtt.md,
/// "Session operations").
///
/// `mqtt` reaches the gate's MQTT broker: `MqttPublish` takes a publish that a client of another
/// gate made (a binary body, docs/protocols/mqtt.md, "Across gates") to this gate's retained
/// store and subscribers; `MqttTakeSession` answers another gate where a client connects with a
/// client id this gate holds: it closes that connection and discards or hands over its
/// persistent session (docs/protocols/mqtt.md, "Across gates"); `MqttInOrder` runs this gate's
/// import of a session handed over in the order of the forwarded publishes.
pub(crate) fn gate_module(
    table: Arc<SessionTable>,
    groups: Arc<Groups>,
    mqtt: Arc<crate::gate::BrokerSlot>,
) -> Module {
    fn arg(a: &[Value], i: usize) -> &str {
        a.get(i).and_then(Value::as_str).unwrap_or_default()
    }
    fn export(r: Result<Arc<Session>, CallError>) -> Result<Value, CallError> {
        r.map(|s| s.export_map())
    }
    struct G {
        table: Arc<SessionTable>,
        groups: Arc<Groups>,
        mqtt: Arc<crate::gate::BrokerSlot>,
    }
    impl std::ops::Deref for G {
        type Target = SessionTable;
        fn deref(&self) -> &SessionTable {
            &self.table
        }
    }
    type T = G;
    // one task in mailbox order: session ops, pushes and room broadcasts arriving from other
    // nodes carry no session of their own, and must still take effect in the order sent
    Module::builder(GATE, G { table, groups, mqtt })
        .execution(crate::Execution::Sequential)
        .handler(
            "Bind",
            |cx: crate::Context<T>, Json(a): Json<Vec<Value>>| async move {
                export(cx.state().bind(arg(&a, 0), arg(&a, 1)))
            },
        )
        .handler(
            "UnBind",
            |cx: crate::Context<T>, Json(a): Json<Vec<Value>>| async move {
                export(cx.state().unbind(arg(&a, 0)))
            },
        )
        .handler(
            "Set",
            |cx: crate::Context<T>, Json(a): Json<Vec<Value>>| async move {
                let v = a.get(2).cloned().unwrap_or(Value::Null);
                export(cx.state().set(arg(&a, 0), arg(&a, 1), v))
            },
        )
        .handler(
            "Remove",
            |cx: crate::Context<T>, Json(a): Json<Vec<Value>>| async move {
                export(cx.state().remove_setting(arg(&a, 0), arg(&a, 1)))
            },
        )
        .handler(
            "Push",
            |cx: crate::Context<T>, Json(a): Json<Vec<Value>>| async move {
                let m = a
                    .get(1)
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                export(cx.state().push_settings(arg(&a, 0), m))
            },
        )
        .handler(
            "Update",
            |cx: crate::Context<T>, Json(a): Json<Vec<Value>>| async move {
                export(cx.state().update(arg(&a, 0)))
            },
        )
        .handler(
            "Send",
            |cx: crate::Context<T>, Json(a): Json<Vec<Value>>| async move {
                let body = Bytes::from(arg(&a, 2).to_owned());
                cx.state()
                    .send(arg(&a, 0), arg(&a, 1), body)
                    .map(|()| "success")
            },
        )
        .handler(
            "GroupAdd",
            |cx: crate::Context<T>, Json(a): Json<Vec<Value>>| async move {
                let h = cx.state().table.get(arg(&a, 1))?;
                cx.state().groups.add(arg(&a, 0), &h)?;
                Ok::<_, CallError>(true)
            },
        )
        .handler(
            "GroupRemove",
            |cx: crate::Context<T>, Json(a): Json<Vec<Value>>| async move {
                cx.state().groups.remove(arg(&a, 0), arg(&a, 1));
                Ok::<_, CallError>(true)
            },
        )
        .handler(
            "GroupBroadcast",
            |cx: crate::Context<T>, Json(a): Json<Vec<Value>>| async move {
                let body = Bytes::from(arg(&a, 2).to_owned());
                let except = a.get(3).and_then(Value::as_str);
                let topic = Bytes::copy_from_slice(arg(&a, 1).as_bytes());
                Ok::<_, CallError>(Json(cx.state().groups.broadcast(
                    arg(&a, 0),
                    topic,
                    body,
                    except,
                )))
            },
        )
        .handler(
            "GroupMembers",
            |cx: crate::Context<T>, Json(a): Json<Vec<Value>>| async move {
                let st = cx.state();
                let list: Vec<Value> = st
                    .groups
                    .members(arg(&a, 0))
                    .iter()
                    .filter_map(|id| st.table.get(id).ok())
                    .map(|h| h.snapshot().export_map())
                    .collect();
                Ok::<_, CallError>(Value::Array(list))
            },
        )
        .handler(
            "MqttPublish",
            |cx: crate::Context<T>, body: Bytes| async move {
                let node = cx.node();
                cx.state().mqtt.deliver(node, body).map(|_| ())
            },
        )
        .handler(
            "MqttTakeSession",
            |cx: crate::Context<T>, body: Bytes| async move {
                let node = cx.node();
                cx.state().mqtt.take_session(node, body).await
            },
        )
        .handler(
            "MqttInOrder",
            |cx: crate::Context<T>, body: Bytes| async move { cx.state().mqtt.run_ordered(&body) },
        )
        // the admin API's questions (docs/admin-api.md): node::admin answers them for this gate
        .handler(
            "AdminInfo",
            |cx: crate::Context<T>, _: Bytes| async move {
                Ok::<_, CallError>(Json(super::admin::info(cx.node())))
            },
        )
        .handler(
            "AdminSessions",
            |cx: crate::Context<T>, Json(q): Json<super::admin::SessionQuery>| async move {
                Ok::<_, CallError>(Json(super::admin::sessions(cx.node(), &q)))
            },
        )
        .handler(
            "AdminKick",
            |cx: crate::Context<T>, Json(k): Json<super::admin::KickRequest>| async move {
                Ok::<_, CallError>(Json(super::admin::kick(cx.node(), &k)))
            },
        )
        .handler(
            "AdminPush",
            |cx: crate::Context<T>, Json(p): Json<super::admin::PushRequest>| async move {
                Ok::<_, CallError>(Json(super::admin::push(cx.node(), &p)))
            },
        )
        .handler(
            "AdminBroadcast",
            |cx: crate::Context<T>, Json(b): Json<super::admin::BroadcastRequest>| async move {
                Ok::<_, CallError>(Json(super::admin::broadcast(cx.node(), &b)))
            },
        )
        .handler(
            "AdminRooms",
            |cx: crate::Context<T>, Json(r): Json<super::admin::RoomsRequest>| async move {
                Ok::<_, CallError>(Json(super::admin::rooms(cx.node(), &r)))
            },
        )
        .handler(
            "Close",
            |cx: crate::Context<T>, Json(a): Json<Vec<Value>>| async move {
                cx.state().close(arg(&a, 0))
            },
        )
        .build()
}
