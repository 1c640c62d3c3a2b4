//! `--verify-journal FILE`: a record of every acknowledged commit of a
//! `--verify` run, so that a later `--verify-only` run can check them all
//! after crashes, restarts of computed, repairs or reformats.
//!
//! The file is text, one line per commit, each ending in the CRC32C of the
//! rest of its line. The first line is the header:
//!
//! ```text
//! storbench-verify-journal 1 volume <id> page_bytes <n> <crc>
//! c <committer> <seq> <bs> <page>:<offset> [<page>:<offset> ...] <crc>
//! ```
//!
//! `1` is the format version; `<crc>` is 8 lowercase hex digits, the
//! CRC32C (Castagnoli) of every byte of the line before the space that
//! precedes it. A `c` line is one acknowledged commit of committer
//! `<committer>`, sequence number `<seq>`: write `i` of it (the `i`-th
//! `<page>:<offset>`, counted from 0) put `<bs>` bytes at byte `<offset>` of
//! page `<page>`, and those bytes are
//! [`payload`]`(committer, seq, i, page, offset, bs)`, so the line is the
//! write's payload seed as well as its range. Sequence numbers start at a
//! random base per run, so runs that share a journal never write the same
//! bytes.
//!
//! Lines are appended as commits are acknowledged (one `write(2)` each,
//! so a killed storbench loses none it wrote) and the file is fsynced before
//! the run reports. A crash can leave the last line torn: a reader ignores
//! a last line that is incomplete or fails its checksum, and a run that
//! appends to the journal first cuts such a line off. A damaged line
//! followed by good ones is an error (the journal itself was damaged).
//!
//! [`check`] reads back the latest journaled write of every byte range:
//! later lines supersede earlier ones where their ranges overlap.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::StreamExt as _;

use computed::client::Client;

use super::cluster_engine::{PAYLOAD_HEADER_BYTES, payload};

const MAGIC: &str = "storbench-verify-journal";
const VERSION: u32 = 1;
/// The tail read to find a torn last line: far more than one line
/// (at most 256 ranges of ~25 bytes).
const TAIL_BYTES_MAX: u64 = 1 << 20;
/// Pages read back at once by [`check`].
const READS_INFLIGHT_MAX: usize = 64;
/// Problems listed by [`check`], at most (all are counted).
pub const LISTED_MAX: usize = 20;

/// What the journal is about: the volume its ranges are on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub volume: u64,
    pub page_bytes: u32,
}

/// One acknowledged commit: write `i` put `bs` bytes at `ranges[i]` (page, offset).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub committer: u32,
    pub seq: u64,
    pub bs: u32,
    pub ranges: Vec<(u64, u64)>,
}

/// `body` with its checksum and newline: one line of the journal.
pub fn line(body: &str) -> String {
    format!("{body} {:08x}\n", crc32c::crc32c(body.as_bytes()))
}

pub fn header_line(h: &Header) -> String {
    line(&format!(
        "{MAGIC} {VERSION} volume {} page_bytes {}",
        h.volume, h.page_bytes
    ))
}

pub fn entry_line(e: &Entry) -> String {
    let mut body = format!("c {} {} {}", e.committer, e.seq, e.bs);
    for (page, offset) in &e.ranges {
        body.push_str(&format!(" {page}:{offset}"));
    }
    line(&body)
}

/// The body of a line whose checksum holds, without its newline.
fn checked_body(line: &str) -> Option<&str> {
    let (body, crc) = line.rsplit_once(' ')?;
    let crc = u32::from_str_radix(crc, 16).ok().filter(|_| crc.len() == 8)?;
    (crc32c::crc32c(body.as_bytes()) == crc).then_some(body)
}

fn parse_header(body: &str) -> Option<Header> {
    let f: Vec<&str> = body.split(' ').collect();
    match f.as_slice() {
        [MAGIC, version, "volume", volume, "page_bytes", page_bytes] if *version == VERSION.to_string() => {
            Some(Header {
                volume: volume.parse().ok()?,
                page_bytes: page_bytes.parse().ok()?,
            })
        }
        _ => None,
    }
}

fn parse_entry(body: &str) -> Option<Entry> {
    let mut f = body.split(' ');
    if f.next()? != "c" {
        return None;
    }
    let committer = f.next()?.parse().ok()?;
    let seq = f.next()?.parse().ok()?;
    let bs = f.next()?.parse().ok()?;
    let mut ranges = Vec::new();
    for r in f {
        let (page, offset) = r.split_once(':')?;
        ranges.push((page.parse().ok()?, offset.parse().ok()?));
    }
    if ranges.is_empty() {
        return None;
    }
    Some(Entry {
        committer,
        seq,
        bs,
        ranges,
    })
}

/// A journal read back: its header and its commits, in the order they were acknowledged.
#[derive(Debug)]
pub struct Journal {
    pub header: Header,
    pub entries: Vec<Entry>,
    /// The last line was torn (incomplete or failing its checksum) and is ignored.
    pub torn_tail: bool,
}

/// Reads the journal at `path`.
pub fn read(path: &Path) -> Result<Journal> {
    let text = std::fs::read(path).with_context(|| format!("reading the verify journal {}", path.display()))?;
    parse(&text).map_err(|e| anyhow!("verify journal {}: {e}", path.display()))
}

fn parse(text: &[u8]) -> Result<Journal, String> {
    let mut lines: Vec<&[u8]> = text.split_inclusive(|&b| b == b'\n').collect();
    let mut torn_tail = false;
    if lines.last().is_some_and(|l| !l.ends_with(b"\n")) {
        lines.pop();
        torn_tail = true;
    }
    let good = |l: &[u8]| -> Option<String> {
        let l = std::str::from_utf8(&l[..l.len() - 1]).ok()?;
        checked_body(l).map(str::to_owned)
    };
    // A complete last line that fails its checksum was torn by a crash too.
    if lines.len() > 1 && lines.last().is_some_and(|l| good(l).is_none()) {
        lines.pop();
        torn_tail = true;
    }
    let Some(first) = lines.first() else {
        return Err("empty: no header line".into());
    };
    let header = good(first)
        .as_deref()
        .and_then(parse_header)
        .ok_or("not a storbench verify journal (no valid header line)")?;
    let mut entries = Vec::with_capacity(lines.len() - 1);
    for (i, l) in lines.iter().enumerate().skip(1) {
        let entry = good(l).as_deref().and_then(parse_entry);
        match entry {
            Some(e) => entries.push(e),
            None => return Err(format!("line {} is damaged (bad checksum or fields)", i + 1)),
        }
    }
    Ok(Journal {
        header,
        entries,
        torn_tail,
    })
}

/// Appends acknowledged commits to a journal.
pub struct JournalWriter {
    file: File,
    path: PathBuf,
}

impl JournalWriter {
    /// Opens `path` to append to: a new journal for `header` (written and
    /// fsynced with its directory), or an existing one of the same volume,
    /// with a torn last line cut off first.
    pub fn open(path: &Path, header: Header) -> Result<JournalWriter> {
        let exists = std::fs::metadata(path).map(|m| m.len() > 0).unwrap_or(false);
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening the verify journal {}", path.display()))?;
        if exists {
            let have = read(path)?;
            if have.header != header {
                bail!(
                    "verify journal {} is of volume {} with {}-byte pages, not of this cluster's volume {} \
                     ({}-byte pages)",
                    path.display(),
                    have.header.volume,
                    have.header.page_bytes,
                    header.volume,
                    header.page_bytes
                );
            }
            if have.torn_tail {
                let keep = good_length(&mut file).with_context(|| format!("reading {}", path.display()))?;
                file.set_len(keep)
                    .with_context(|| format!("cutting the torn last line of {}", path.display()))?;
                storaged::errln!("storbench: {}: cut off a torn last line (a crash)", path.display());
            }
        } else {
            file.write_all(header_line(&header).as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            file.sync_all()
                .with_context(|| format!("fsyncing {}", path.display()))?;
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            File::open(dir)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("fsyncing {}", dir.display()))?;
        }
        Ok(JournalWriter {
            file,
            path: path.to_owned(),
        })
    }

    /// Appends `entry` in one write, so a killed storbench leaves whole lines.
    pub fn append(&mut self, entry: &Entry) -> Result<()> {
        self.file
            .write_all(entry_line(entry).as_bytes())
            .with_context(|| format!("appending to the verify journal {}", self.path.display()))
    }

    /// Makes every appended line durable.
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .with_context(|| format!("fsyncing the verify journal {}", self.path.display()))
    }
}

/// Length of `file` without its torn last line: up to the end of the last
/// complete line whose checksum holds.
fn good_length(file: &mut File) -> std::io::Result<u64> {
    let len = file.metadata()?.len();
    let start = len.saturating_sub(TAIL_BYTES_MAX);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    let mut end = tail.len();
    // Drop an incomplete line, then a complete one that fails its checksum.
    if !tail.ends_with(b"\n") {
        end = tail.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    } else {
        let prev = tail[..end - 1].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let last = std::str::from_utf8(&tail[prev..end - 1]).ok();
        if last.and_then(checked_body).is_none() {
            end = prev;
        }
    }
    Ok(start + end as u64)
}

/// What [`check`] found.
#[derive(Debug, Default)]
pub struct CheckOutcome {
    pub pages: u64,
    pub checked: u64,
    pub missing: u64,
    pub wrong: u64,
    /// Ranges that hold a later, unacknowledged write of their committer.
    pub later: u64,
    pub listed: Vec<String>,
}

/// The latest journaled write of part of a page: `[start, end)` of the
/// write that put `bs` bytes at `offset`.
#[derive(Debug, Clone, Copy)]
struct Piece {
    end: u64,
    committer: u32,
    seq: u64,
    index: u32,
    offset: u64,
    bs: u64,
}

/// For each page, its pieces by start: what the latest journaled writes left.
fn latest_writes(entries: &[Entry]) -> BTreeMap<u64, BTreeMap<u64, Piece>> {
    let mut pages: BTreeMap<u64, BTreeMap<u64, Piece>> = BTreeMap::new();
    for e in entries {
        for (i, &(page, offset)) in e.ranges.iter().enumerate() {
            let piece = Piece {
                end: offset + u64::from(e.bs),
                committer: e.committer,
                seq: e.seq,
                index: i as u32,
                offset,
                bs: u64::from(e.bs),
            };
            let map = pages.entry(page).or_default();
            // Pieces are disjoint, so those ending after `offset` and
            // starting before the new end are exactly the ones it covers.
            let covered: Vec<u64> = map
                .range(..piece.end)
                .rev()
                .take_while(|(_, p)| p.end > offset)
                .map(|(&s, _)| s)
                .collect();
            for s in covered {
                let Some(old) = map.remove(&s) else { continue };
                if s < offset {
                    map.insert(s, Piece { end: offset, ..old });
                }
                if old.end > piece.end {
                    map.insert(piece.end, old);
                }
            }
            map.insert(offset, piece);
        }
    }
    pages
}

/// Reads back every page the journal names and compares each byte range
/// with the latest journaled write of it. A range may also hold a later
/// write of the same committer whose ack was not journaled (in flight at a
/// crash or past the grace): it may have landed, and supersedes.
pub async fn check(client: &Client, journal: &Journal) -> Result<CheckOutcome> {
    let info = client.info;
    if journal.header.volume != info.volume || journal.header.page_bytes != info.page_bytes {
        bail!(
            "the journal is of volume {} with {}-byte pages; the cluster serves volume {} with {}-byte pages",
            journal.header.volume,
            journal.header.page_bytes,
            info.volume,
            info.page_bytes
        );
    }
    let pages = latest_writes(&journal.entries);
    let mut out = CheckOutcome {
        pages: pages.len() as u64,
        ..CheckOutcome::default()
    };
    let mut reads = futures_util::stream::iter(pages.iter())
        .map(|(&page, pieces)| async move { (page, pieces, client.read(page).await) })
        .buffered(READS_INFLIGHT_MAX);
    while let Some((page, pieces, read)) = reads.next().await {
        let problem = |out: &mut CheckOutcome, what: &str, text: String| {
            if what == "missing" {
                out.missing += 1;
            } else {
                out.wrong += 1;
            }
            if out.listed.len() < LISTED_MAX {
                out.listed.push(format!("{what}: page {page} {text}"));
            }
        };
        if page >= info.pages {
            for _ in pieces {
                out.checked += 1;
                problem(
                    &mut out,
                    "wrong",
                    format!("is beyond the volume's {} pages", info.pages),
                );
            }
            continue;
        }
        let got = read.with_context(|| format!("--verify-only: reading page {page}"))?;
        if got.bytes.len() != info.page_bytes as usize {
            bail!("--verify-only: page {page} came back with {} bytes", got.bytes.len());
        }
        for (&start, p) in pieces {
            out.checked += 1;
            let what_range = format!(
                "bytes {start}..{}: journaled committer {} commit {} (read point {})",
                p.end, p.committer, p.seq, got.read_point
            );
            if p.end > u64::from(info.page_bytes) {
                problem(&mut out, "wrong", format!("{what_range}: past the end of the page"));
                continue;
            }
            let have = &got.bytes[start as usize..p.end as usize];
            let want = payload(p.committer, p.seq, p.index, page, p.offset, p.bs as usize);
            let cut = (start - p.offset) as usize..(p.end - p.offset) as usize;
            if have == &want[cut.clone()] {
                continue;
            }
            // Who wrote what is there, by the header at the write's start.
            let holder = (p.bs as usize >= PAYLOAD_HEADER_BYTES).then(|| {
                let h = &got.bytes[p.offset as usize..p.offset as usize + PAYLOAD_HEADER_BYTES];
                (
                    u32::from_le_bytes([h[0], h[1], h[2], h[3]]),
                    u64::from_le_bytes([h[4], h[5], h[6], h[7], h[8], h[9], h[10], h[11]]),
                    u32::from_le_bytes([h[12], h[13], h[14], h[15]]),
                )
            });
            let later = holder.is_some_and(|(c, s, i)| {
                start == p.offset
                    && c == p.committer
                    && s > p.seq
                    && have == &payload(c, s, i, page, p.offset, p.bs as usize)[cut.clone()]
            });
            if later {
                out.later += 1;
                continue;
            }
            let older = have.iter().all(|&b| b == 0) || holder.is_some_and(|(c, s, _)| c == p.committer && s < p.seq);
            let holds = match holder {
                Some((c, s, _)) => format!("; the page holds committer {c} commit {s} there"),
                None => String::new(),
            };
            problem(
                &mut out,
                if older { "missing" } else { "wrong" },
                format!("{what_range}{holds}"),
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(committer: u32, seq: u64, bs: u32, ranges: &[(u64, u64)]) -> Entry {
        Entry {
            committer,
            seq,
            bs,
            ranges: ranges.to_vec(),
        }
    }

    fn journal_text(entries: &[Entry]) -> String {
        let mut s = header_line(&Header {
            volume: 1,
            page_bytes: 8192,
        });
        for e in entries {
            s.push_str(&entry_line(e));
        }
        s
    }

    #[test]
    fn lines_round_trip() {
        let e = vec![
            entry(3, 1 << 40, 128, &[(10, 0), (13, 128)]),
            entry(0, 7, 8192, &[(2, 0)]),
        ];
        let j = parse(journal_text(&e).as_bytes()).unwrap();
        assert_eq!(j.header.volume, 1);
        assert_eq!(j.header.page_bytes, 8192);
        assert_eq!(j.entries, e);
        assert!(!j.torn_tail);
    }

    #[test]
    fn a_torn_last_line_is_ignored_and_a_damaged_middle_one_is_not() {
        let e = vec![entry(1, 1, 128, &[(1, 0)]), entry(1, 2, 128, &[(1, 128)])];
        let text = journal_text(&e);
        // Cut anywhere inside the last line: the first entry survives.
        let last_start = text[..text.len() - 1].rfind('\n').unwrap() + 1;
        for cut in last_start + 1..text.len() - 1 {
            let j = parse(&text.as_bytes()[..cut]).unwrap();
            assert_eq!(j.entries, e[..1], "cut at {cut}");
            assert!(j.torn_tail);
        }
        // A complete last line with a flipped byte: torn as well.
        let mut flipped = text.clone().into_bytes();
        flipped[last_start + 2] ^= 1;
        let j = parse(&flipped).unwrap();
        assert_eq!(j.entries, e[..1]);
        // The same damage in a middle line is an error naming the line.
        let mut three = text.clone();
        three.push_str(&entry_line(&entry(1, 3, 128, &[(1, 256)])));
        let mut damaged = three.into_bytes();
        damaged[last_start + 2] ^= 1;
        let err = parse(&damaged).unwrap_err();
        assert!(err.contains("line 3"), "{err}");
        assert!(parse(b"").is_err());
        assert!(parse(b"hello\n").is_err());
    }

    #[test]
    fn a_writer_appends_after_cutting_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let h = Header {
            volume: 1,
            page_bytes: 8192,
        };
        let mut w = JournalWriter::open(&path, h).unwrap();
        w.append(&entry(0, 1, 64, &[(0, 0)])).unwrap();
        w.sync().unwrap();
        drop(w);
        // A crash mid-line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"c 0 2 64 0:6").unwrap();
        drop(f);
        let mut w = JournalWriter::open(&path, h).unwrap();
        w.append(&entry(0, 3, 64, &[(0, 64)])).unwrap();
        drop(w);
        let j = read(&path).unwrap();
        assert_eq!(j.entries.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 3]);
        assert!(!j.torn_tail);
        // Another volume's journal is refused.
        let other = Header { volume: 2, ..h };
        assert!(JournalWriter::open(&path, other).is_err());
    }

    #[test]
    fn later_writes_supersede_the_parts_they_cover() {
        let pages = latest_writes(&[
            entry(0, 1, 100, &[(5, 0), (5, 100)]),
            entry(0, 2, 50, &[(5, 75)]),
            entry(1, 9, 10, &[(6, 0)]),
        ]);
        let p5: Vec<(u64, u64, u64)> = pages[&5].iter().map(|(&s, p)| (s, p.end, p.seq)).collect();
        assert_eq!(p5, vec![(0, 75, 1), (75, 125, 2), (125, 200, 1)]);
        let piece = pages[&5][&125];
        assert_eq!((piece.offset, piece.index), (100, 1), "the rest of write 1 of commit 1");
        assert_eq!(pages[&6].len(), 1);
    }
}
