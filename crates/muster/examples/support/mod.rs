//! Helpers shared by the examples.

/// Walks the command line: `--flag value` and `--flag=value` alike. Each
/// flag goes to `on_flag` with a function that takes its value; `-h` and
/// `--help` print `usage` and exit.
pub fn parse_flags(
    usage: &str,
    mut on_flag: impl FnMut(&str, &mut dyn FnMut() -> Result<String, String>) -> Result<(), String>,
) -> Result<(), String> {
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{usage}");
            std::process::exit(0);
        }
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (flag, None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        on_flag(&name, &mut value)?;
    }
    Ok(())
}

/// A duration flag's value, in muster's syntax (`500ms`, `2s`, `1m`).
pub fn duration(flag: &str, value: String) -> Result<std::time::Duration, String> {
    muster::parse_duration(&value).map_err(|e| format!("{flag}: {e}"))
}
