//! `passwd`: manage the password file of `[auth] password_file`, as `mosquitto_passwd` does:
//! `warren passwd FILE USER` adds or replaces a user (the password is asked twice on a
//! terminal, or read as one line from standard input), `-D` deletes one, `-b` takes the password
//! from the command line. The file is created with mode 0600 and replaced atomically.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use warren::auth::password;

/// Arguments of `passwd`.
#[derive(Args)]
pub(crate) struct PasswdArgs {
    /// Delete USER from the file.
    #[arg(short = 'D', conflicts_with = "batch")]
    delete: bool,
    /// Batch mode: the password is the third argument (it shows in the process list and the
    /// shell history: prefer standard input in scripts).
    #[arg(short = 'b')]
    batch: bool,
    /// The password file (created when missing).
    file: PathBuf,
    /// The user name (no `:`).
    user: String,
    /// The password, with -b.
    password: Option<String>,
}

/// Run `passwd`; `name` is the binary's, for the error prefix (`warren passwd: …`).
pub(crate) fn main(name: &str, args: PasswdArgs) -> ExitCode {
    match run(name, args) {
        Ok(msg) => {
            if !msg.is_empty() {
                eprintln!("{msg}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{name} passwd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(name: &str, args: PasswdArgs) -> Result<String, String> {
    if !password::valid_user_name(&args.user) {
        return Err(format!(
            "user name {:?} must not be empty or contain ':' or a line break",
            args.user
        ));
    }
    if args.delete {
        if args.password.is_some() {
            return Err("-D takes no password".into());
        }
        return if password::update_file(&args.file, &args.user, None)? {
            Ok(String::new())
        } else {
            Err(format!(
                "user {:?} is not in {}",
                args.user,
                args.file.display()
            ))
        };
    }
    let pw = match (args.batch, args.password) {
        (true, Some(p)) => p,
        (true, None) => {
            return Err(format!(
                "-b needs a password: {name} passwd -b FILE USER PASSWORD"
            ));
        }
        (false, Some(_)) => return Err("a password on the command line needs -b".into()),
        (false, None) => read_password()?,
    };
    if pw.is_empty() {
        return Err("empty password".into());
    }
    if pw.len() > password::MAX_PASSWORD_BYTES {
        return Err(format!(
            "password longer than {} bytes",
            password::MAX_PASSWORD_BYTES
        ));
    }
    password::update_file(&args.file, &args.user, Some(pw.as_bytes()))?;
    Ok(String::new())
}

/// Twice from the terminal without echo, or one line from standard input.
fn read_password() -> Result<String, String> {
    if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ").map_err(|e| e.to_string())?;
        let again = rpassword::prompt_password("Reenter password: ").map_err(|e| e.to_string())?;
        if first != again {
            return Err("passwords do not match".into());
        }
        return Ok(first);
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("reading the password: {e}"))?;
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}
