//! Command line -> configuration -> mount.

use unionmount::config::{self, Parsed};

fn main() {
    unionmount::watcher::run_if_asked();
    let cfg = match config::parse(std::env::args_os()) {
        Ok(Parsed::Mount(c)) => c,
        Ok(Parsed::Print(text)) => {
            print!("{text}");
            return;
        }
        Ok(Parsed::Remount(r)) => {
            if let Err(e) = unionmount::mount::remount(&r) {
                eprintln!("unionmount: {}", config::one_line(&e.to_string()));
                std::process::exit(1);
            }
            return;
        }
        Err(e) => {
            eprintln!("unionmount: {}", config::one_line(&e.to_string()));
            std::process::exit(1);
        }
    };
    unionmount::logger::init(cfg.log_level.filter());
    if let Err(e) = unionmount::mount::run(*cfg) {
        eprintln!("unionmount: {}", config::one_line(&e.to_string()));
        std::process::exit(1);
    }
}
