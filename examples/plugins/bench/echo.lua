-- The Lua side of the plugin benchmark (docs/benchmarks.md, "Plugins"): the body back, as the
-- Rust Echo module does.
function HD_Echo(session, msg) return msg end
