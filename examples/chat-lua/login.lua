-- The chat demo's Login module in Lua (examples/chat/README.md, "Handlers"): binds the session
-- to the user name it is given. The password is not checked, as in mqant's demo; a real
-- deployment authenticates clients at connect ([auth], docs/security.md).
--
-- Loaded with msg_type = "json": `msg` is the request's JSON object as a table.

-- A client's login: the one handler it may call before it has a uid (login_handlers).
function HD_Login(session, msg)
  local user, password = msg.userName, msg.passWord
  if type(user) ~= "string" or type(password) ~= "string" then
    -- the demo answers bad input with a Result, not an Error
    return "userName or passWord cannot be nil"
  end
  -- a name another live session holds is refused ([auth] uid_conflict): the error is the reply
  session:bind(user)
  session:set("login", true)
  return "login success " .. user
end

-- Called by Chat when someone joins a room, to show a call between modules; not client-visible
-- (no HD_ prefix, not listed).
function getRand(session, msg)
  local room = type(msg) == "table" and msg[1] or msg
  return "My is Login Module " .. tostring(room)
end
