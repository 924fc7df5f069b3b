//! Opening a cache: [`Cache::open`] reads the superblock, has `recovery.rs` replay the
//! log, checks the replayed dirty data against the backing devices given, and builds
//! the engine state from what was replayed ([`State::new`]) before the threads start.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use slog::{error, info, o, Logger};

use crate::device::BlockDevice;
use crate::engine::{Backing, Cache};
use crate::error::{Error, Result};
use crate::format::MAX_BACKING;
use crate::recovery::{random_u64, replay, superblock_of, RecoveryReport};
use crate::state::{BackingSlot, Inner, Recovered, State};
use crate::tunables::Tunables;

/// Options for [`Cache::open`].
#[derive(Clone)]
pub struct OpenOptions {
    /// RAM for segment buffers, in bytes: [`Cache::open`] takes `ram_bytes /
    /// segment_size` buffers (rounded down, at least 2). Default 64 MiB.
    pub ram_bytes: u64,
    /// Initial tunables.
    pub tunables: Tunables,
    /// Logger; the engine logs state changes and errors, never per I/O.
    pub logger: Logger,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            ram_bytes: 64 << 20,
            tunables: Tunables::default(),
            logger: Logger::root(slog::Discard, o!()),
        }
    }
}

impl Cache {
    /// Opens a formatted cache device with its backing devices, replays the log and
    /// starts the flusher and writeback threads.
    ///
    /// Refused: a device that is not an lc cache or of another format version; dirty
    /// data for a backing device id that is not given, or given with another label.
    pub fn open(
        cache: Arc<dyn BlockDevice>,
        backing: Vec<Backing>,
        opts: OpenOptions,
    ) -> Result<(Cache, RecoveryReport)> {
        let desc = cache.describe();
        let sb = superblock_of(cache.as_ref())?;
        let geo = sb.geometry;
        let mut slots: Vec<Option<BackingSlot>> = (0..MAX_BACKING).map(|_| None).collect();
        for b in &backing {
            if b.id as usize >= MAX_BACKING {
                return Err(Error::Invalid(format!("backing device id {} > 254", b.id)));
            }
            if slots[b.id as usize].is_some() {
                return Err(Error::Invalid(format!(
                    "backing device id {} given twice",
                    b.id
                )));
            }
            if b.label.len() > 32 {
                return Err(Error::Invalid(format!(
                    "label {:?} longer than 32 bytes",
                    b.label
                )));
            }
            slots[b.id as usize] = Some(BackingSlot::new(b.dev.clone(), b.label.clone(), 0));
        }
        let ram_buffers = (opts.ram_bytes / geo.segment_size as u64).max(2) as usize;
        let planned =
            ((geo.nr_segments as usize + ram_buffers) * geo.lines_per_segment as usize).max(64);
        let started = Instant::now();
        let mut r = replay(cache.as_ref(), &sb, planned)?;
        // What replay read may still sit in the device's volatile cache (after a kill
        // rather than a power cut). Make it durable before anything claims it is.
        cache.flush().map_err(|e| Error::io(&desc, 0, e))?;
        for (id, reason) in &r.report.damaged {
            error!(opts.logger, "cache log damaged: a durable segment failed its checks; its data is lost and reads of it fail";
                   "cache" => &desc, "segment" => id, "reason" => reason);
        }
        if r.damage.unresolved() {
            let d = r.damage.report();
            error!(opts.logger, "data lost to cache log damage";
                   "cache" => &desc, "lost_lines" => format!("{:?}", d.lost_lines),
                   "unknown_upto" => d.unknown_upto);
        }
        if let Some(tail) = &r.report.tail {
            info!(opts.logger, "log ends at a torn segment (never acknowledged durable)"; "cache" => &desc, "at" => tail);
        }
        // Every dirty line must belong to a backing device given now, with its old label.
        // Clean copies of a device not given now, given under another label, or not in
        // the table, are forgotten (they may not match what is there): they hold no
        // dirty data. Lines of a recorded device in segments before its `since` belong
        // to a device detached earlier under its id (drained: nothing dirty of it is
        // needed), and are forgotten too. The rule is decided once per device.
        let forget: Vec<Forget> = (0..MAX_BACKING)
            .map(|dev| match (&slots[dev], &sb.backing[dev]) {
                (Some(s), Some(b)) if b.label == s.label => Forget::Before(b.since),
                _ => Forget::Clean,
            })
            .collect();
        // One pass over the table (it is large: 5 MiB per GiB of cache): what to forget,
        // and over what is kept, dirty lines per device, which devices may hold clean
        // copies, and the oldest segment holding a line of each.
        let mut foreign = Vec::new();
        let mut dirty = vec![0u64; MAX_BACKING];
        let mut oldest = vec![r.last_id + 1; MAX_BACKING];
        for (k, l) in r.index.iter() {
            let dev = crate::index::unkey(k).0 as usize;
            let forgotten = match forget[dev] {
                Forget::Clean => l.clean,
                Forget::Before(since) => l.seg < since,
            };
            if forgotten {
                foreign.push(k);
                continue;
            }
            oldest[dev] = oldest[dev].min(l.seg);
            if !l.clean {
                dirty[dev] += 1;
            } else if let Some(s) = slots[dev].as_mut() {
                s.may_hold_clean = true;
            }
        }
        for k in foreign {
            r.index.remove(k);
        }
        // Where each given device's lines may start: the superblock's `since` when it is
        // the device recorded there (same label). Else the oldest segment holding a line
        // of it kept above (a device given at the last open whose record was not
        // committed yet keeps its dirty lines), or the next segment: a device new to
        // this cache, or one that replaces another under its id.
        for (dev, s) in slots.iter_mut().enumerate() {
            if let Some(s) = s {
                s.since = match &sb.backing[dev] {
                    Some(b) if b.label == s.label => b.since,
                    _ => oldest[dev],
                };
            }
        }
        for (dev, &n) in dirty.iter().enumerate().filter(|(_, &n)| n > 0) {
            let old = sb.backing[dev]
                .as_ref()
                .map(|b| b.label.clone())
                .unwrap_or_default();
            match &mut slots[dev] {
                None => {
                    return Err(Error::BadFormat {
                        device: desc,
                        reason: format!(
                            "holds dirty data for backing device {dev} ({old:?}), which is not attached"
                        ),
                    })
                }
                Some(s) if sb.backing[dev].is_some() && s.label != old => {
                    return Err(Error::BadFormat {
                        device: desc,
                        reason: format!(
                            "holds dirty data for backing device {dev} labelled {old:?}, but {:?} was given with that id",
                            s.label
                        ),
                    })
                }
                Some(s) => s.dirty += n,
            }
        }
        let report = r.report.clone();
        info!(opts.logger, "cache opened"; "cache" => &desc, "segments" => geo.nr_segments,
              "last_writeback_id" => r.wb_id, "replayed_segments" => report.replayed_segments,
              "restored_lines" => report.restored_lines, "ms" => started.elapsed().as_millis() as u64,
              "checkpoint_ms" => report.checkpoint_time.as_millis() as u64,
              "walk_ms" => report.walk_time.as_millis() as u64);
        let state = State::new(
            Recovered {
                index: r.index,
                backing: slots,
                last_id: r.last_id,
                last_crc: r.last_crc,
                wb_id: r.wb_id,
                sb_seq: sb.seq,
                damage: r.damage,
                recovered_gens: r.recovered_gens,
                ambiguous: r.ambiguous,
                cp_seq: r.cp_seq,
                cp_upto: r.cp_upto,
                chain: r.chain,
                wb_crc: r.wb_crc,
                line_crcs: r.line_crcs,
            },
            &geo,
            ram_buffers,
            opts.tunables.clone(),
        );
        // A device given now that the table does not record (or records otherwise) is
        // recorded before it takes a write: a later open then tells its lines from
        // those of a device detached under its id (FORMAT.md, `since`).
        let table_changed = crate::state::backing_table(&state) != sb.backing;
        let inner = Arc::new(Inner {
            cache,
            geo,
            uuid: sb.uuid,
            nonce: random_u64(),
            state: Mutex::new(state),
            io_cv: Condvar::new(),
            worker_cv: Condvar::new(),
            log: opts.logger,
            side: Default::default(),
        });
        if table_changed {
            crate::logio::commit(&inner, None)?;
        }
        Ok((Cache::from_inner(inner), report))
    }
}

/// Which recovered lines of a backing device id open forgets.
#[derive(Clone, Copy)]
enum Forget {
    /// Clean copies: the device is not given, not in the table, or given under
    /// another label.
    Clean,
    /// Lines in segments before this one (the device's `since`): the device given is
    /// the one the table records.
    Before(u64),
}
