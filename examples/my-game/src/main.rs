//! my-game: a warren server with one module of its own. `App` brings the whole `warren`
//! command line (serve, node, check-config, print-default-config, bench, passwd).

mod greeter;

fn main() -> std::process::ExitCode {
    warren_app::App::new("my-game")
        .version(env!("CARGO_PKG_VERSION"))
        .module("Greeter", greeter::module) // [[module]] type = "Greeter", or --module Greeter
        .run()
}
