//! `--pool PATH` and `SNAPVOL_POOL`: the pool given once, for every command.
//!
//! Every command takes its pool as its first argument (after the subcommand's words;
//! `backup restore` takes it last). With `--pool PATH` anywhere on the command line, or
//! `SNAPVOL_POOL` in the environment (the flag wins), the argument is left out and the pool
//! goes into its place before the command line is parsed. A pool given both ways (the first
//! argument names a file holding a snapvol pool as well) is a usage error, not a guess: with
//! the environment set, `snapvol destroy other.img db` must not read as two volume names.

use std::ffi::OsString;
use std::io::Read;
use std::path::Path;

/// Commands whose pool is the argument right after their words, by those words' count.
fn pool_position(words: &[&str]) -> Option<Placement> {
    match words {
        ["completions", ..] | ["demo", ..] | ["help", ..] | [] => None,
        ["pool", _, ..] => Some(Placement::After(2)),
        ["pool"] => None,
        ["backup", "push", ..] => Some(Placement::After(2)),
        ["backup", "restore", ..] => Some(Placement::Last),
        ["backup", ..] => None,
        [_, ..] => Some(Placement::After(1)),
    }
}

enum Placement {
    /// Right after this many command words.
    After(usize),
    /// After every other argument.
    Last,
}

/// Whether `path` names a file or device that holds a snapvol superblock.
fn holds_a_pool(path: &str) -> bool {
    let Ok(mut f) = std::fs::File::open(Path::new(path)) else {
        return false;
    };
    let mut head = vec![0u8; 8192];
    f.read_exact(&mut head).is_ok() && (&head[0..4] == b"SVSB" || &head[4096..4100] == b"SVSB")
}

/// The command line with the pool from `--pool` or `env` (SNAPVOL_POOL) in its place.
pub fn place_pool(args: Vec<OsString>, env: Option<OsString>) -> Result<Vec<OsString>, String> {
    let mut out: Vec<OsString> = Vec::with_capacity(args.len() + 1);
    let mut flag: Option<OsString> = None;
    let mut it = args.into_iter();
    out.extend(it.next());
    let mut rest_is_positional = false;
    while let Some(a) = it.next() {
        if rest_is_positional {
            out.push(a);
            continue;
        }
        let s = a.to_string_lossy().into_owned();
        if s == "--" {
            rest_is_positional = true;
            out.push(a);
        } else if s == "--pool" {
            flag = Some(it.next().ok_or("--pool needs a path")?);
        } else if let Some(v) = s.strip_prefix("--pool=") {
            flag = Some(OsString::from(v));
        } else {
            out.push(a);
        }
    }
    let explicit = flag.is_some();
    let Some(pool) = flag.or(env.filter(|e| !e.is_empty())) else {
        return Ok(out);
    };
    // The command's words: the leading arguments that are not options (the only global
    // option, --direct, takes no value).
    let words: Vec<String> = out[1..]
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .filter(|a| !a.starts_with('-'))
        .take(2)
        .collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let Some(place) = pool_position(&words) else {
        if explicit && !words.is_empty() && words[0] != "help" {
            return Err(format!("--pool: `{}` takes no pool", words.join(" ")));
        }
        return Ok(out);
    };
    let at = match place {
        Placement::Last => out.len(),
        Placement::After(n) => {
            // Index just past the n-th command word.
            let mut seen = 0;
            let mut i = 1;
            while i < out.len() && seen < n {
                if !out[i].to_string_lossy().starts_with('-') {
                    seen += 1;
                }
                i += 1;
            }
            i
        }
    };
    let given = match place {
        Placement::Last => out.last(),
        Placement::After(_) => out.get(at),
    };
    if let Some(g) = given.map(|g| g.to_string_lossy().into_owned()) {
        if !g.starts_with('-') && (Path::new(&g) == Path::new(&pool) || holds_a_pool(&g)) {
            return Err(format!(
                "the pool is given twice: {} (from {}) and {g}; leave one out",
                pool.to_string_lossy(),
                if explicit { "--pool" } else { "SNAPVOL_POOL" }
            ));
        }
    }
    out.insert(at, pool);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn placed(v: &[&str], env: Option<&str>) -> Result<Vec<String>, String> {
        place_pool(os(v), env.map(OsString::from)).map(|a| {
            a.into_iter()
                .map(|s| s.to_string_lossy().into_owned())
                .collect()
        })
    }

    #[test]
    fn the_pool_goes_where_each_command_takes_it() {
        let p = Some("/p.img");
        assert_eq!(
            placed(&["sv", "create", "db", "--size", "1G"], p).unwrap(),
            ["sv", "create", "/p.img", "db", "--size", "1G"]
        );
        assert_eq!(
            placed(&["sv", "--direct", "pool", "info", "--json"], p).unwrap(),
            ["sv", "--direct", "pool", "info", "/p.img", "--json"]
        );
        assert_eq!(
            placed(&["sv", "backup", "push", "db@s", "--to", "/r"], p).unwrap(),
            ["sv", "backup", "push", "/p.img", "db@s", "--to", "/r"]
        );
        assert_eq!(
            placed(&["sv", "backup", "restore", "/r", "01ab"], p).unwrap(),
            ["sv", "backup", "restore", "/r", "01ab", "/p.img"]
        );
        // The flag wins over the environment, in either spelling, anywhere.
        assert_eq!(
            placed(&["sv", "list", "--pool", "/q.img", "-t", "volume"], p).unwrap(),
            ["sv", "list", "/q.img", "-t", "volume"]
        );
        assert_eq!(
            placed(&["sv", "--pool=/q.img", "list"], None).unwrap(),
            ["sv", "list", "/q.img"]
        );
        // Commands without a pool are left alone; asked for one explicitly, they refuse.
        assert_eq!(
            placed(&["sv", "completions", "bash"], p).unwrap(),
            ["sv", "completions", "bash"]
        );
        assert!(placed(&["sv", "--pool", "/q", "demo"], None).is_err());
        assert!(placed(&["sv", "list", "--pool"], None).is_err());
        // Nothing given: nothing changes.
        assert_eq!(
            placed(&["sv", "list", "x.img"], None).unwrap(),
            ["sv", "list", "x.img"]
        );
        assert_eq!(
            placed(&["sv", "list", "x.img"], Some("")).unwrap(),
            ["sv", "list", "x.img"]
        );
    }

    #[test]
    fn a_pool_given_twice_is_refused() {
        let err = placed(&["sv", "list", "/p.img"], Some("/p.img")).unwrap_err();
        assert!(
            err.contains("given twice") && err.contains("SNAPVOL_POOL"),
            "{err}"
        );
    }
}
