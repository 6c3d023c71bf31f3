//! The job log: framed records appended to `JOB_DIR/log`.
//!
//! Each record is `[stream: u8][timestamp_ns: u64 LE][len: u32 LE][data]` with
//! `len <= MAX_RECORD`, appended by one `write_all` on an `O_APPEND` file. The
//! shim writes a record as soon as a pipe read returns (no line buffering), so a
//! follower sees output within milliseconds; readers may therefore meet a torn
//! last record (the writer mid-append) and must treat it as "not yet written".
//!
//! Offsets handed to readers are always record boundaries, so a follower that
//! resumes from a chunk's `next_offset` sees nothing twice and misses nothing.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Mutex, mpsc};
use std::time::{SystemTime, UNIX_EPOCH};

/// The job's standard output.
pub const STDOUT: u8 = 1;
/// The job's standard error.
pub const STDERR: u8 = 2;
/// bridge's own lines ("bridge: setup cached").
pub const SYSTEM: u8 = 3;

/// Largest data length of one record. Larger writes become several records.
pub const MAX_RECORD: usize = 64 * 1024;
/// Bytes before each record's data.
pub const HEADER_LEN: usize = 1 + 8 + 4;

/// Upper bound on what [`tail_start`] returns, so a log of progress bars
/// (`\r` without `\n`) cannot make "the last 10 lines" the whole file.
pub const TAIL_MAX_BYTES: usize = 4 * 1024 * 1024;

/// Appends records to a job log. Shared between the threads that drain a
/// step's pipes; the mutex keeps each record's bytes contiguous even if the
/// kernel ever returned a short write.
#[derive(Debug)]
pub struct LogWriter {
    file: Mutex<WriterState>,
    /// Set by [`LogWriter::sync_behind`]: after this many bytes the writer
    /// wakes the thread that writes the log back to disk.
    behind: Option<(u64, mpsc::SyncSender<()>)>,
}

#[derive(Debug)]
struct WriterState {
    file: File,
    /// Set by [`LogWriter::finish`]: the shim's exit record promises that
    /// nothing is appended after it, even by a straggling pipe reader.
    finished: bool,
    /// Bytes appended since the background sync was last woken.
    unsynced: u64,
    /// Data bytes that could not be appended (a full disk), and why.
    lost: u64,
    lost_error: Option<String>,
    /// The last loss was a full disk (or a spent quota).
    lost_full: bool,
    /// The records of one write, kept between writes.
    buf: Vec<u8>,
}

impl LogWriter {
    /// Opens (creating if needed) `path` for appending.
    pub fn open(path: &Path) -> io::Result<LogWriter> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(LogWriter {
            file: Mutex::new(WriterState {
                file,
                finished: false,
                unsynced: 0,
                lost: 0,
                lost_error: None,
                lost_full: false,
                buf: Vec::new(),
            }),
            behind: None,
        })
    }

    /// Makes a thread write the log back (`fdatasync`) each time `every`
    /// bytes were appended, so [`LogWriter::finish`] waits for the last
    /// stretch only: a job that prints 100 MB in a burst would otherwise
    /// hold its `exit.json`, and so its end and the follower's, for the
    /// seconds the disk takes. Writers never wait for that thread.
    pub fn sync_behind(mut self, every: u64) -> io::Result<LogWriter> {
        let file = self
            .file
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .file
            .try_clone()?;
        let (tx, rx) = mpsc::sync_channel::<()>(1);
        std::thread::Builder::new()
            .name("log-sync".into())
            .spawn(move || {
                // Ends when the writer, the only sender, is dropped.
                for () in rx {
                    let _ = file.sync_data();
                }
            })?;
        self.behind = Some((every.max(1), tx));
        Ok(self)
    }

    /// Appends `data` as one record per `MAX_RECORD` bytes, stamped now.
    /// Empty data writes nothing: readers never see empty records.
    ///
    /// A record that does not fit (the disk is full) is cut off again, so
    /// the log never holds a torn record that later ones would follow (a
    /// reader would stop there for good); its bytes count as lost
    /// ([`LogWriter::lost`]).
    pub fn write(&self, stream: u8, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let ts = now_ns();
        let mut guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let st = &mut *guard;
        if st.finished {
            return Err(io::Error::other("job log already finished"));
        }
        // Every record in one buffer, appended by one write: a pump that
        // gathered a megabyte costs one syscall, not sixteen.
        st.buf.clear();
        for part in data.chunks(MAX_RECORD) {
            st.buf.push(stream);
            st.buf.extend_from_slice(&ts.to_le_bytes());
            st.buf.extend_from_slice(&(part.len() as u32).to_le_bytes());
            st.buf.extend_from_slice(part);
        }
        if let Err((e, whole)) = append_records(&mut st.file, &st.buf) {
            st.lost += (data.len() - whole * MAX_RECORD) as u64;
            st.lost_error = Some(e.to_string());
            st.lost_full = matches!(
                e.kind(),
                io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
            );
            return Err(e);
        }
        if let Some((every, wake)) = &self.behind {
            st.unsynced += data.len() as u64;
            if st.unsynced >= *every {
                st.unsynced = 0;
                // Full: a sync is pending already and will cover this too.
                let _ = wake.try_send(());
            }
        }
        Ok(())
    }

    /// Flushes the log's data to disk (`fdatasync`), so a record the shim
    /// reported as written survives a crash of the machine.
    pub fn sync(&self) -> io::Result<()> {
        let st = self.file.lock().unwrap_or_else(|e| e.into_inner());
        st.file.sync_data()
    }

    /// Output the job printed that is not in its log: the data bytes that
    /// could not be written, the last error, and whether it was a full disk.
    pub fn lost(&self) -> Lost {
        let st = self.file.lock().unwrap_or_else(|e| e.into_inner());
        Lost {
            bytes: st.lost,
            error: st.lost_error.clone(),
            disk_full: st.lost_full,
        }
    }

    /// Syncs the log and refuses every later write.
    pub fn finish(&self) -> io::Result<()> {
        let mut st = self.file.lock().unwrap_or_else(|e| e.into_inner());
        st.finished = true;
        st.file.sync_data()
    }
}

/// What [`LogWriter::lost`] reports.
#[derive(Debug, Clone, Default)]
pub struct Lost {
    pub bytes: u64,
    pub error: Option<String>,
    pub disk_full: bool,
}

/// Appends `records` (whole records, each but the last of
/// `HEADER_LEN + MAX_RECORD` bytes) with one `write` (the file is
/// `O_APPEND`). A short write (a full disk) is cut back to the last whole
/// record, unless another writer appended behind it meanwhile (a cluster
/// job's head shares the log); the error comes with the number of records
/// kept.
fn append_records(file: &mut File, records: &[u8]) -> Result<(), (io::Error, usize)> {
    use std::io::Seek;
    const WHOLE: usize = HEADER_LEN + MAX_RECORD;
    let mut done = 0;
    while done < records.len() {
        let e = match file.write(&records[done..]) {
            Ok(0) => io::ErrorKind::WriteZero.into(),
            Ok(n) => {
                done += n;
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => e,
        };
        let whole = done / WHOLE;
        let torn = done - whole * WHOLE;
        if torn > 0
            && let Ok(end) = file.stream_position()
            && file.metadata().is_ok_and(|m| m.len() == end)
        {
            let _ = file.set_len(end - torn as u64);
        }
        return Err((e, whole));
    }
    Ok(())
}

/// Consecutive records of one stream, coalesced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub stream: u8,
    /// Timestamp of the first record in the chunk (unix nanoseconds).
    pub timestamp_ns: u64,
    pub data: Vec<u8>,
    /// Record boundary just after this chunk: where a follower resumes.
    pub next_offset: u64,
}

/// A record header, parsed.
#[derive(Debug, Clone, Copy)]
struct Header {
    stream: u8,
    timestamp_ns: u64,
    len: u32,
}

fn parse_header(h: &[u8; HEADER_LEN], offset: u64) -> io::Result<Header> {
    let stream = h[0];
    let timestamp_ns = u64::from_le_bytes(h[1..9].try_into().expect("8 bytes"));
    let len = u32::from_le_bytes(h[9..13].try_into().expect("4 bytes"));
    if !(STDOUT..=SYSTEM).contains(&stream) || len as usize > MAX_RECORD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("job log is corrupt at offset {offset} (stream {stream}, length {len})"),
        ));
    }
    Ok(Header {
        stream,
        timestamp_ns,
        len,
    })
}

fn open_log(path: &Path) -> io::Result<Option<File>> {
    match File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Walks the records of a log from a record boundary up to a fixed end (the
/// file's length when the reader looked: a busy writer cannot keep it going),
/// reading large blocks and parsing records out of memory.
struct Records<'f> {
    file: &'f File,
    end: u64,
    /// Bytes read ahead; `buf[0]` is at file offset `buf_off`.
    buf: Vec<u8>,
    buf_off: u64,
    /// Start of the next record in `buf`.
    pos: usize,
    block: usize,
}

/// One record found by [`Records`]; `data` indexes [`Records::buf`].
#[derive(Debug, Clone)]
struct Found {
    offset: u64,
    header: Header,
    data: std::ops::Range<usize>,
}

impl<'f> Records<'f> {
    fn new(file: &'f File, start: u64, end: u64, block: usize) -> Records<'f> {
        Records {
            file,
            end,
            buf: Vec::new(),
            buf_off: start,
            pos: 0,
            block: block.max(HEADER_LEN + MAX_RECORD),
        }
    }

    /// Makes `need` bytes from `pos` available; false if the log ends first.
    fn fill(&mut self, need: usize) -> io::Result<bool> {
        if self.buf.len() - self.pos >= need {
            return Ok(true);
        }
        self.buf.drain(..self.pos);
        self.buf_off += self.pos as u64;
        self.pos = 0;
        let at = self.buf_off + self.buf.len() as u64;
        let avail = self.end.saturating_sub(at);
        if (self.buf.len() as u64) + avail < need as u64 {
            return Ok(false);
        }
        let want = (avail as usize).min(self.block.max(need - self.buf.len()));
        let old = self.buf.len();
        self.buf.resize(old + want, 0);
        self.file.read_exact_at(&mut self.buf[old..], at)?;
        Ok(true)
    }

    /// The next complete record; `None` at the end or at a torn last record.
    fn next(&mut self) -> io::Result<Option<Found>> {
        if !self.fill(HEADER_LEN)? {
            return Ok(None);
        }
        let offset = self.buf_off + self.pos as u64;
        let h: &[u8; HEADER_LEN] = self.buf[self.pos..self.pos + HEADER_LEN]
            .try_into()
            .expect("header length");
        let header = parse_header(h, offset)?;
        let total = HEADER_LEN + header.len as usize;
        if !self.fill(total)? {
            return Ok(None);
        }
        let start = self.pos + HEADER_LEN;
        self.pos += total;
        Ok(Some(Found {
            offset,
            header,
            data: start..self.pos,
        }))
    }

    /// File offset just after the last record returned.
    fn offset(&self) -> u64 {
        self.buf_off + self.pos as u64
    }
}

/// Reads the complete records from `offset` (a record boundary), coalescing
/// consecutive records of one stream, and stops once about `max_bytes` of data
/// were read (at least one record is returned when one is complete). A torn
/// last record is left for the next call; a missing file reads as empty.
pub fn read_chunks(path: &Path, offset: u64, max_bytes: usize) -> io::Result<Vec<Chunk>> {
    LogReader::new(path).read_chunks(offset, max_bytes)
}

/// A log read again and again (a follower): opened once it exists, then
/// kept open.
#[derive(Debug)]
pub struct LogReader {
    path: std::path::PathBuf,
    file: Option<File>,
}

impl LogReader {
    pub fn new(path: &Path) -> LogReader {
        LogReader {
            path: path.to_path_buf(),
            file: None,
        }
    }

    /// [`read_chunks`] of this log.
    pub fn read_chunks(&mut self, offset: u64, max_bytes: usize) -> io::Result<Vec<Chunk>> {
        if self.file.is_none() {
            self.file = open_log(&self.path)?;
        }
        match &self.file {
            Some(file) => read_chunks_of(file, offset, max_bytes),
            None => Ok(Vec::new()),
        }
    }
}

fn read_chunks_of(file: &File, offset: u64, max_bytes: usize) -> io::Result<Vec<Chunk>> {
    let end = file.metadata()?.len();
    let block = max_bytes.saturating_add(HEADER_LEN * 64).min(1024 * 1024);
    let mut recs = Records::new(file, offset, end, block);
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut total = 0usize;
    while total < max_bytes.max(1) {
        let Some(r) = recs.next()? else { break };
        let data = &recs.buf[r.data];
        total += data.len();
        match chunks.last_mut() {
            Some(c) if c.stream == r.header.stream => c.data.extend_from_slice(data),
            _ => chunks.push(Chunk {
                stream: r.header.stream,
                timestamp_ns: r.header.timestamp_ns,
                data: data.to_vec(),
                next_offset: 0,
            }),
        }
        chunks.last_mut().expect("pushed").next_offset = recs.offset();
    }
    Ok(chunks)
}

/// Where one record sits, for [`tail_start`].
#[derive(Debug, Clone, Copy)]
struct Rec {
    offset: u64,
    header: Header,
    newlines: usize,
}

/// The last `lines` lines of the log (all streams), as chunks ready to print.
/// The first chunk may start inside a record (its data is that record's
/// suffix); the last chunk's `next_offset` is a record boundary from which a
/// follower continues with [`read_chunks`]. An empty result means the log has
/// no complete record yet: follow from offset 0. With `lines == 0` the result
/// is one empty chunk at the end of the log (or nothing), so the caller still
/// learns where to follow from. At most [`TAIL_MAX_BYTES`] are returned.
///
/// Costs one sequential read of the log (records carry no back links): in a
/// release build, about 30 ms for a million one-line records (25 MB), less
/// for the usual multi-line records.
pub fn tail_start(path: &Path, lines: usize) -> io::Result<Vec<Chunk>> {
    let Some(file) = open_log(path)? else {
        return Ok(Vec::new());
    };
    let end = file.metadata()?.len();
    let mut scan = Records::new(&file, 0, end, 1024 * 1024);
    // The shortest suffix of records holding `lines + 1` newlines (the extra
    // one ends the line before the first wanted line) and TAIL_MAX_BYTES.
    let mut recs: VecDeque<Rec> = VecDeque::new();
    let mut nl_total = 0usize;
    let mut bytes_total = 0usize;
    while let Some(r) = scan.next()? {
        let newlines = scan.buf[r.data].iter().filter(|&&b| b == b'\n').count();
        recs.push_back(Rec {
            offset: r.offset,
            header: r.header,
            newlines,
        });
        nl_total += newlines;
        bytes_total += r.header.len as usize;
        while recs.len() > 1 {
            let front = recs[0];
            let flen = front.header.len as usize;
            if nl_total - front.newlines > lines || bytes_total - flen >= TAIL_MAX_BYTES {
                nl_total -= front.newlines;
                bytes_total -= flen;
                recs.pop_front();
            } else {
                break;
            }
        }
    }
    let pos = scan.offset();
    let Some(first) = recs.front() else {
        return Ok(Vec::new());
    };
    if lines == 0 {
        let last = recs.back().expect("non-empty");
        return Ok(vec![Chunk {
            stream: last.header.stream,
            timestamp_ns: last.header.timestamp_ns,
            data: Vec::new(),
            next_offset: pos,
        }]);
    }
    // One read of the suffix, then split it back into records.
    let mut raw = vec![0u8; (pos - first.offset) as usize];
    file.read_exact_at(&mut raw, first.offset)?;
    let mut datas: Vec<(&Rec, &[u8])> = Vec::with_capacity(recs.len());
    let mut at = 0usize;
    for rec in &recs {
        let len = rec.header.len as usize;
        datas.push((rec, &raw[at + HEADER_LEN..at + HEADER_LEN + len]));
        at += HEADER_LEN + len;
    }
    // Where the wanted lines start, counted in data bytes from the suffix start.
    let total: usize = datas.iter().map(|(_, d)| d.len()).sum();
    let mut cut = total.saturating_sub(TAIL_MAX_BYTES);
    let mut seen = 0usize;
    let mut at_byte = total;
    'outer: for (_, d) in datas.iter().rev() {
        for &b in d.iter().rev() {
            at_byte -= 1;
            // A newline ending the log closes the last line; it does not
            // start another one.
            if b == b'\n' && at_byte + 1 != total {
                seen += 1;
                if seen == lines {
                    cut = cut.max(at_byte + 1);
                    break 'outer;
                }
            }
        }
    }
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut data_at = 0usize;
    let mut next = first.offset;
    for (rec, d) in datas {
        next += (HEADER_LEN + d.len()) as u64;
        let start = data_at;
        data_at += d.len();
        if data_at <= cut {
            continue;
        }
        let part = &d[cut.saturating_sub(start)..];
        match chunks.last_mut() {
            Some(c) if c.stream == rec.header.stream => {
                c.data.extend_from_slice(part);
                c.next_offset = next;
            }
            _ => chunks.push(Chunk {
                stream: rec.header.stream,
                timestamp_ns: rec.header.timestamp_ns,
                data: part.to_vec(),
                next_offset: next,
            }),
        }
    }
    Ok(chunks)
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(chunks: &[Chunk]) -> String {
        chunks
            .iter()
            .map(|c| String::from_utf8_lossy(&c.data).into_owned())
            .collect()
    }

    #[test]
    fn records_in_order_and_coalesced() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        assert!(read_chunks(&p, 0, 1 << 20).unwrap().is_empty());
        let w = LogWriter::open(&p).unwrap();
        w.write(STDOUT, b"a\n").unwrap();
        w.write(STDOUT, b"b\n").unwrap();
        w.write(STDERR, b"e\n").unwrap();
        w.write(SYSTEM, b"bridge: x\n").unwrap();
        w.write(STDOUT, b"").unwrap();
        let c = read_chunks(&p, 0, 1 << 20).unwrap();
        assert_eq!(
            c.iter().map(|c| c.stream).collect::<Vec<_>>(),
            [STDOUT, STDERR, SYSTEM]
        );
        assert_eq!(c[0].data, b"a\nb\n");
        assert_eq!(text(&c), "a\nb\ne\nbridge: x\n");
        let len = std::fs::metadata(&p).unwrap().len();
        assert_eq!(c.last().unwrap().next_offset, len);
        assert!(read_chunks(&p, len, 1 << 20).unwrap().is_empty());
    }

    #[test]
    fn syncing_behind_keeps_every_record() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        let w = LogWriter::open(&p).unwrap().sync_behind(1000).unwrap();
        let mut want = Vec::new();
        for i in 0..2000 {
            let line = format!("line {i}\n");
            w.write(STDOUT, line.as_bytes()).unwrap();
            want.extend_from_slice(line.as_bytes());
        }
        w.finish().unwrap();
        assert!(w.write(STDOUT, b"late\n").is_err());
        drop(w); // ends the sync thread
        let c = read_chunks(&p, 0, 1 << 20).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].data, want);
    }

    #[test]
    fn large_writes_split_and_resume_without_loss() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        let w = LogWriter::open(&p).unwrap();
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        w.write(STDOUT, &big).unwrap();
        for i in 0..1000 {
            w.write(
                if i % 3 == 0 { STDERR } else { STDOUT },
                format!("{i}\n").as_bytes(),
            )
            .unwrap();
        }
        // Small max_bytes: many calls, each resuming where the last stopped.
        let mut all = Vec::new();
        let mut off = 0;
        let mut calls = 0;
        loop {
            let c = read_chunks(&p, off, 1000).unwrap();
            let Some(last) = c.last() else { break };
            off = last.next_offset;
            calls += 1;
            all.extend(c);
        }
        assert!(calls > 5, "{calls} calls");
        let got: Vec<u8> = all.iter().flat_map(|c| c.data.clone()).collect();
        let mut want = big.clone();
        for i in 0..1000 {
            want.extend_from_slice(format!("{i}\n").as_bytes());
        }
        assert_eq!(got, want);
    }

    #[test]
    fn torn_last_record_is_not_returned() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        let w = LogWriter::open(&p).unwrap();
        w.write(STDOUT, b"one\n").unwrap();
        let boundary = std::fs::metadata(&p).unwrap().len();
        w.write(STDOUT, b"two\n").unwrap();
        let full = std::fs::read(&p).unwrap();
        for cut in boundary as usize..full.len() {
            std::fs::write(&p, &full[..cut]).unwrap();
            let c = read_chunks(&p, 0, 1 << 20).unwrap();
            assert_eq!(text(&c), "one\n", "cut at {cut}");
            assert_eq!(c[0].next_offset, boundary);
            assert!(read_chunks(&p, boundary, 1 << 20).unwrap().is_empty());
            let t = tail_start(&p, 5).unwrap();
            assert_eq!(text(&t), "one\n");
            assert_eq!(t.last().unwrap().next_offset, boundary);
        }
    }

    #[test]
    fn tail_across_record_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        assert!(tail_start(&p, 3).unwrap().is_empty());
        let w = LogWriter::open(&p).unwrap();
        // Lines split across records and streams.
        w.write(STDOUT, b"l1\nl2\nl").unwrap();
        w.write(STDOUT, b"3\nl4").unwrap();
        w.write(STDERR, b"\ne5\n").unwrap();
        w.write(SYSTEM, b"s6\n").unwrap();
        let end = std::fs::metadata(&p).unwrap().len();
        let t = tail_start(&p, 3).unwrap();
        assert_eq!(text(&t), "l4\ne5\ns6\n");
        assert_eq!(t[0].stream, STDOUT);
        assert_eq!(t[0].data, b"l4");
        assert_eq!(t.last().unwrap().next_offset, end);
        assert_eq!(text(&tail_start(&p, 4).unwrap()), "l3\nl4\ne5\ns6\n");
        assert_eq!(
            text(&tail_start(&p, 100).unwrap()),
            "l1\nl2\nl3\nl4\ne5\ns6\n"
        );
        let zero = tail_start(&p, 0).unwrap();
        assert_eq!(zero.len(), 1);
        assert!(zero[0].data.is_empty());
        assert_eq!(zero[0].next_offset, end);
        // An unterminated last line counts as a line.
        w.write(STDOUT, b"partial").unwrap();
        assert_eq!(text(&tail_start(&p, 2).unwrap()), "s6\npartial");
        // A follower continues from the tail without gaps.
        let t = tail_start(&p, 1).unwrap();
        let off = t.last().unwrap().next_offset;
        w.write(STDOUT, b" more\n").unwrap();
        assert_eq!(text(&read_chunks(&p, off, 1 << 20).unwrap()), " more\n");
    }

    #[test]
    fn tail_of_a_million_lines_is_quick() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        let w = LogWriter::open(&p).unwrap();
        let mut block = String::new();
        for i in 0..1_000_000u32 {
            block.push_str(&format!("line {i}\n"));
            if block.len() > 60_000 {
                w.write(STDOUT, block.as_bytes()).unwrap();
                block.clear();
            }
        }
        w.write(STDOUT, block.as_bytes()).unwrap();
        let t0 = std::time::Instant::now();
        let t = tail_start(&p, 2).unwrap();
        let took = t0.elapsed();
        assert_eq!(text(&t), "line 999998\nline 999999\n");
        assert!(took.as_millis() < 1000, "tail took {took:?}");
    }
}
