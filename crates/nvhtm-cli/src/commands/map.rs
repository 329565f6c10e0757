//! The map commands: set, get, del, load, dump.

use std::io::{BufRead, BufWriter, Write};
use std::path::Path;

use nvhtm::periodic::PeriodicOptions;
use nvhtm::pool::PoolOptions;
use nvhtm::{AnyMap, AutoDomain, Heap, MapKind};

use crate::format::human_size;

use super::CommandResult;

/// Opens the map in a pool, whichever the pool's root says it holds (creating a strict one in
/// a pool that holds an empty heap), in the pool's mode. Closing it (which every command does)
/// makes its changes durable: a periodic map syncs, and for a FAMS pool that is the sync that
/// commits them. A periodic map runs no persister thread here (each command is short and
/// closes) and scans its arena in the background (a read-only command stops the scan).
pub fn open(path: &Path, layout: &str) -> Result<AnyMap<AutoDomain>, Box<dyn std::error::Error>> {
    let heap = Heap::load(super::open_pool(path, &PoolOptions::layout(layout))?)?;
    let periodic = PeriodicOptions { background_scan: true, ..PeriodicOptions::manual() };
    Ok(AnyMap::open(heap, MapKind::Strict, periodic)?)
}

/// `\t`, `\n`, `\r` and `\\` escaped, so any bytes fit a tab-separated line.
pub fn escape(bytes: &[u8], out: &mut Vec<u8>) {
    for &b in bytes {
        match b {
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\\' => out.extend_from_slice(b"\\\\"),
            _ => out.push(b),
        }
    }
}

/// The inverse of [`escape`].
pub fn unescape(text: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.iter();
    while let Some(&b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        out.push(match bytes.next() {
            Some(b't') => b'\t',
            Some(b'n') => b'\n',
            Some(b'r') => b'\r',
            Some(b'\\') => b'\\',
            Some(&other) => return Err(format!("unknown escape \\{}", other as char)),
            None => return Err("a line ends with a lone backslash".into()),
        });
    }
    Ok(out)
}

/// `nvhtm set`.
pub fn set(path: &Path, key: &str, value: &str, layout: &str) -> CommandResult {
    let map = open(path, layout)?;
    map.upsert(key.as_bytes(), value.as_bytes())?;
    map.close()?;
    println!("OK");
    Ok(())
}

/// `nvhtm get`: the value, or exit status 1 when the key is absent.
pub fn get(path: &Path, key: &str, layout: &str) -> CommandResult {
    let map = open(path, layout)?;
    let value = map.get(key.as_bytes())?;
    map.close()?;
    match value {
        Some(value) => {
            let mut out = std::io::stdout().lock();
            out.write_all(&value)?;
            out.write_all(b"\n")?;
            Ok(())
        }
        None => Err(format!("{key:?}: no such key").into()),
    }
}

/// `nvhtm del`: prints 1 if the key was removed, 0 if it was absent.
pub fn del(path: &Path, key: &str, layout: &str) -> CommandResult {
    let map = open(path, layout)?;
    let removed = map.remove(key.as_bytes())?;
    map.close()?;
    println!("{}", u8::from(removed));
    Ok(())
}

/// `nvhtm load`: tab-separated, escaped `key<TAB>value` lines from `file` (`-`: stdin).
pub fn load(path: &Path, file: &Path, layout: &str) -> CommandResult {
    let map = open(path, layout)?;
    let (reader, total): (Box<dyn BufRead>, u64) = if file == Path::new("-") {
        (Box::new(std::io::stdin().lock()), 0)
    } else {
        let f = std::fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let len = f.metadata()?.len();
        (Box::new(std::io::BufReader::new(f)), len)
    };
    let bar = indicatif::ProgressBar::new(total).with_style(
        indicatif::ProgressStyle::with_template("loading {bar:40} {bytes}/{total_bytes} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut loaded = 0u64;
    for (number, line) in reader.split(b'\n').enumerate() {
        let line = line?;
        bar.inc(line.len() as u64 + 1);
        let line = line.strip_suffix(b"\r").unwrap_or(&line);
        if line.is_empty() {
            continue;
        }
        let at = |e: String| format!("{}:{}: {e}", file.display(), number + 1);
        let tab =
            line.iter().position(|&b| b == b'\t').ok_or_else(|| at("no tab between key and value".into()))?;
        let key = unescape(&line[..tab]).map_err(at)?;
        let value = unescape(&line[tab + 1..]).map_err(at)?;
        map.upsert(&key, &value)?;
        loaded += 1;
        if loaded % 4096 == 0 {
            bar.set_message(format!("{loaded} keys"));
        }
    }
    bar.finish_and_clear();
    map.close()?;
    println!("loaded {loaded} keys");
    Ok(())
}

/// `nvhtm dump`: every entry as an escaped `key<TAB>value` line.
pub fn dump(path: &Path, layout: &str) -> CommandResult {
    let map = open(path, layout)?;
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut line = Vec::new();
    let mut failed = None;
    map.for_each(|key, value| {
        line.clear();
        escape(key, &mut line);
        line.push(b'\t');
        escape(value, &mut line);
        line.push(b'\n');
        match out.write_all(&line) {
            Ok(()) => true,
            Err(e) => {
                failed = Some(e);
                false
            }
        }
    })?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    out.flush()?;
    drop(out);
    map.close()?;
    Ok(())
}

/// `nvhtm stats`.
pub fn stats(path: &Path, layout: &str, json: bool) -> CommandResult {
    let map = open(path, layout)?;
    let stats = map.stats()?;
    map.close()?;
    if json {
        super::print_json(&stats);
    } else {
        println!("map         {}", stats.kind);
        println!("entries     {}", stats.entries);
        println!("segments    {}", stats.segments);
        if let Some(log) = &stats.log {
            println!(
                "log         {} of records, {} live ({:.1}%), replayed in {:.2} ms",
                human_size(log.log_bytes),
                human_size(log.live_bytes),
                stats.load_factor * 100.0,
                log.replay_ms
            );
        } else {
            println!("directory   depth {} ({} entries)", stats.global_depth, 1u64 << stats.global_depth);
            println!("load factor {:.3}", stats.load_factor);
        }
        if let Some(longest) = stats.longest_bucket {
            println!("longest     {longest} entries in one bucket");
        }
        if let (Some(ms), Some((current, durable))) = (stats.epoch_ms, stats.epochs) {
            println!("epochs      {ms} ms long; current {current}, durable {durable}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_round_trips_every_byte() {
        let all: Vec<u8> = (0..=255u8).collect();
        let mut escaped = Vec::new();
        escape(&all, &mut escaped);
        assert!(!escaped.contains(&b'\t') && !escaped.contains(&b'\n'));
        assert_eq!(unescape(&escaped).unwrap(), all);
        assert!(unescape(b"bad\\q").unwrap_err().contains("unknown escape"));
    }
}
