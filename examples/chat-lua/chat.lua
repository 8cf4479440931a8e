-- The chat demo's Chat module in Lua (examples/chat/README.md): rooms of logged-in users, join,
-- say (to all or to one), and leave notices when a member's connection closes. The same routes,
-- replies, pushes and error texts as the Rust module (examples/chat/src/chat.rs), mqant v1.1
-- flavour.
--
-- Loaded with msg_type = "json" and execution = "sequential": one Lua state holds the rooms and
-- runs one call at a time. Helpers are `local`, so that only the HD_ functions and the hook are
-- the module's handlers.

-- room name -> { members = { { uid = ..., session = ... }, ... } } (join order)
local rooms = {}

-- Each room is also a gate group, so a message to the whole room is encoded once.
local function group(room)
  return "chat/" .. room
end

local function logged_in(session)
  if session == nil or session.uid == nil or session.uid == "" then
    error("Not Logined", 0)
  end
  return session.uid
end

local function index_of(members, pred)
  for i, m in ipairs(members) do
    if pred(m) then return i end
  end
  return nil
end

-- Remove the member holding `session` from `room` and tell the others.
local function leave(room, session)
  local r = rooms[room]
  if r == nil then return end
  local i = index_of(r.members, function(m) return m.session.id == session.id end)
  if i == nil then return end
  local left = table.remove(r.members, i)
  if #r.members == 0 then rooms[room] = nil end
  pcall(warren.room_remove, group(room), session)
  warren.room_broadcast(group(room), "Chat/OnLeave", { roomName = room, user = left.uid })
end

function HD_JoinChat(session, msg)
  local room = type(msg.roomName) == "string" and msg.roomName or ""
  if room == "" then
    error("roomName cannot be nil", 0)
  end
  local uid = logged_in(session)
  -- the original demo calls another module here to show inter-module RPC
  local ok, answer = pcall(warren.call, "Login", "getRand", { room })
  warren.log("debug", "Login/getRand answered", ok, answer)

  local r = rooms[room]
  if r == nil then
    r = { members = {} }
    rooms[room] = r
  end
  local i = index_of(r.members, function(m) return m.uid == uid end)
  local replaced = nil
  if i == nil then
    table.insert(r.members, { uid = uid, session = session })
  else
    -- joining again replaces the member's session (a new connection of the same user)
    replaced = r.members[i].session
    r.members[i].session = session
  end
  if replaced ~= nil and replaced.id ~= session.id then
    pcall(warren.room_remove, group(room), replaced)
  end
  warren.room_add(group(room), session)
  warren.room_broadcast(group(room), "Chat/OnJoin", { roomName = room, user = uid }, session)
  local users = {}
  for _, m in ipairs(r.members) do table.insert(users, m.uid) end
  return { users = users }
end

function HD_Say(session, msg)
  local room, content = msg.roomName, msg.content
  if type(room) ~= "string" or type(content) ~= "string" then
    error("roomName or say cannot be nil", 0)
  end
  local target = type(msg.target) == "string" and msg.target or "*"
  local uid = logged_in(session)
  local r = rooms[room]
  if r == nil then
    error("No room", 0)
  end
  if index_of(r.members, function(m) return m.uid == uid end) == nil then
    error("You haven't been in the room yet", 0)
  end
  local push = { from = uid, msg = content, roomName = room, target = target }
  if target == "*" then
    warren.room_broadcast(group(room), "Chat/OnChat", push)
  else
    local i = index_of(r.members, function(m) return m.uid == target end)
    if i == nil then
      error("This user haven't been in the room yet", 0)
    end
    local recipient = r.members[i].session
    if not pcall(recipient.send, recipient, "Chat/OnChat", push) then
      leave(room, recipient)
      error("The user has left the room", 0)
    end
  end
  return "say success"
end

-- A member's connection closed: it leaves every room it was in.
function on_session_closed(session)
  local left = {}
  for name, r in pairs(rooms) do
    if index_of(r.members, function(m) return m.session.id == session.id end) then
      table.insert(left, name)
    end
  end
  for _, name in ipairs(left) do
    leave(name, session)
  end
end
