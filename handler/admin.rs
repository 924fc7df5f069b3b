//! Offline administration of cache devices: `lc format` and `lc check`. These work on
//! the device directly and need no running daemon.

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Arc;

use lc_cache::{check_device, format_device, probe, BlockDevice, FileDevice, FormatOptions};

use crate::error::{Error, Result};
use crate::units::human;

/// Options of `lc format`.
pub struct FormatArgs<'a> {
    /// The cache device (block device or regular file).
    pub device: &'a Path,
    /// Logical block size, 512 or 4096.
    pub block_size: u32,
    /// Segment size in bytes.
    pub segment_size: u32,
    /// On-disk format version (2; 1 for a cache an older lc can open).
    pub version: u32,
    /// Skip the confirmation.
    pub yes: bool,
    /// Format even if the device holds an lc cache.
    pub force: bool,
}

/// Formats a cache device. `confirm` supplies the answer to the confirmation prompt
/// (stdin in the CLI); output goes to `out`.
pub fn format(args: &FormatArgs, confirm: &mut dyn BufRead, out: &mut dyn Write) -> Result<()> {
    let dev: Arc<dyn BlockDevice> = Arc::new(
        FileDevice::open_exclusive(args.device, false).map_err(|source| Error::OpenDevice {
            path: args.device.to_path_buf(),
            source,
        })?,
    );
    let existing = match probe(dev.as_ref()) {
        Ok(sb) => sb.map(|sb| sb.geometry),
        // A damaged lc superblock still means lc data may be there.
        Err(e) => {
            if !args.force {
                return Err(Error::DamagedCache { source: e });
            }
            None
        }
    };
    if existing.is_none() && !args.force {
        if let Some(what) = foreign_signature(dev.as_ref()) {
            return Err(Error::ForeignData {
                path: args.device.to_path_buf(),
                what,
            });
        }
    }
    if let Some(g) = existing {
        if !args.force {
            return Err(Error::AlreadyFormatted {
                path: args.device.to_path_buf(),
                nr_segments: g.nr_segments,
                segment_size: g.segment_size as u64,
            });
        }
    }
    if !args.yes {
        write!(
            out,
            "Format {} ({}) as an lc cache? Everything on it is lost. Type 'yes': ",
            args.device.display(),
            human(dev.size())
        )?;
        out.flush()?;
        let mut answer = String::new();
        confirm.read_line(&mut answer)?;
        if answer.trim() != "yes" {
            return Err(Error::NotConfirmed);
        }
    }
    let g = format_device(
        dev.as_ref(),
        FormatOptions {
            block_size: args.block_size,
            segment_size: args.segment_size,
            version: args.version,
        },
    )?;
    writeln!(
        out,
        "formatted {}: format v{}, block size {}, {} segments of {} ({} lines each), {} of cache",
        args.device.display(),
        g.version,
        g.block_size,
        g.nr_segments,
        human(g.segment_size as u64),
        g.lines_per_segment,
        human(g.total_lines() * 4096)
    )?;
    Ok(())
}

/// What the first 128 KiB of a device say it holds, when it is something `lc format`
/// would destroy: a file system, a partition table, an LVM or RAID member, swap, LUKS.
fn foreign_signature(dev: &dyn BlockDevice) -> Option<&'static str> {
    let mut b = vec![0u8; (128usize << 10).min(dev.size() as usize)];
    dev.read_at(&mut b, 0).ok()?;
    let at = |off: usize, magic: &[u8]| b.get(off..off + magic.len()) == Some(magic);
    let found = [
        (at(1080, &[0x53, 0xef]), "an ext2/3/4 file system"),
        (at(0, b"XFSB"), "an XFS file system"),
        (at(65536 + 64, b"_BHRfS_M"), "a btrfs file system"),
        (at(0, b"LUKS\xba\xbe"), "a LUKS volume"),
        (
            at(512, b"LABELONE") || at(0, b"LABELONE"),
            "an LVM physical volume",
        ),
        (at(4096, &[0xfc, 0x4e, 0x2b, 0xa9]), "an MD RAID member"),
        (at(4086, b"SWAPSPACE2"), "a swap area"),
        (at(512, b"EFI PART"), "a GPT partition table"),
        (
            at(510, &[0x55, 0xaa]),
            "a DOS partition table or boot sector",
        ),
    ];
    found.iter().find(|(hit, _)| *hit).map(|(_, what)| *what)
}

/// Result of `lc check`: the text (or JSON) to print and whether the log is intact.
pub struct CheckOutcome {
    /// What to print.
    pub text: String,
    /// False when the log walk stopped at a damaged segment.
    pub clean: bool,
}

/// Read-only metadata check of a cache device.
pub fn check(device: &Path, json: bool) -> Result<CheckOutcome> {
    let dev = FileDevice::open(device, false).map_err(|source| Error::OpenDevice {
        path: device.to_path_buf(),
        source,
    })?;
    let r = check_device(&dev)?;
    let g = r.superblock.geometry;
    let backing: Vec<serde_json::Value> = r
        .superblock
        .backing
        .iter()
        .enumerate()
        .filter_map(|(i, b)| b.as_ref().map(|b| (i, b)))
        .map(|(i, b)| {
            serde_json::json!({
                "id": i,
                "label": b.label,
                "size": b.size,
                "dirty_lines": r.dirty_lines.iter().find(|(d, _)| *d as usize == i).map_or(0, |x| x.1),
            })
        })
        .collect();
    // A torn tail (a crash mid-write) loses nothing acknowledged: not damage. A damaged
    // superblock copy loses nothing either (the other copy is used) but is reported.
    let clean = r.damage.is_none();
    // Segments a checkpoint covers are dirty too, but were not walked.
    let dirty_segments = r.log.replayed_segments
        + r.log
            .checkpoint
            .as_ref()
            .map_or(0, |c| c.upto - r.log.last_writeback_id);
    let checkpoint = r.log.checkpoint.as_ref().map(|c| {
        serde_json::json!({"seq": c.seq, "upto_segment": c.upto, "entries": c.entries, "loaded": c.loaded})
    });
    let dirty_lines: u64 = r.dirty_lines.iter().map(|x| x.1).sum();
    let damage = r.damage.as_ref().map(|d| {
        let lun_of = |id: u8| {
            r.superblock.backing[id as usize]
                .as_ref()
                .map(|b| b.label.clone())
        };
        serde_json::json!({
            "segments": r.log.damaged.iter().map(|(id, why)| serde_json::json!({"id": id, "reason": why})).collect::<Vec<_>>(),
            "lost_lines": d.lost_lines.iter().map(|(id, n)| serde_json::json!({"backing_id": id, "label": lun_of(*id), "lines": n})).collect::<Vec<_>>(),
            "lost_ranges": d.lost_ranges.iter().map(|(id, s, n)| serde_json::json!({"backing_id": id, "sector": s, "sectors": n})).collect::<Vec<_>>(),
            "unknown_after_segment": (d.unknown_upto > 0).then_some(d.unknown_upto),
            "recorded_lines": r.log.loss_records.map_or(0, |(_, n)| n),
        })
    });
    let text = if json {
        serde_json::json!({
            "device": device.display().to_string(),
            "format_version": g.version,
            "block_size": g.block_size,
            "segment_size": g.segment_size,
            "nr_segments": g.nr_segments,
            "lines_per_segment": g.lines_per_segment,
            "superblock_seq": r.superblock.seq,
            "superblock_copies": r.superblock_copies.iter().map(|c| c.clone().unwrap_or_else(|| "ok".into())).collect::<Vec<_>>(),
            "last_writeback_id": r.log.last_writeback_id,
            "dirty_segments": dirty_segments,
            "replayed_segments": r.log.replayed_segments,
            "checkpoint": checkpoint,
            "checkpoint_skipped": r.log.checkpoint_skipped,
            "dirty_lines": dirty_lines,
            "line_copies": r.log.restored_lines,
            "torn_tail": r.log.tail,
            "damage": damage,
            "backing": backing,
        })
        .to_string()
    } else {
        let mut t = format!(
            "{}: lc cache, format v{}, block size {}, {} segments of {} ({} lines each)\n",
            device.display(),
            g.version,
            g.block_size,
            g.nr_segments,
            human(g.segment_size as u64),
            g.lines_per_segment
        );
        t += &format!(
            "superblock commit {}, written back through segment {}\n",
            r.superblock.seq, r.log.last_writeback_id
        );
        for (name, c) in ["A", "B"].iter().zip(&r.superblock_copies) {
            if let Some(why) = c {
                t += &format!(
                    "superblock copy {name} damaged ({why}); the other copy is used and the next commit rewrites it\n"
                );
            }
        }
        t += &format!(
            "log: {} dirty segments, {} dirty lines ({} line copies)\n",
            dirty_segments, dirty_lines, r.log.restored_lines
        );
        match &r.log.checkpoint {
            Some(c) => {
                t += &format!(
                    "checkpoint {} used: covers segments up to {} ({} entries, {} not written back); {} segments walked after it\n",
                    c.seq, c.upto, c.entries, c.loaded, r.log.replayed_segments
                )
            }
            None if g.version >= 2 => {
                t += &format!(
                    "no checkpoint used; {} segments walked\n",
                    r.log.replayed_segments
                )
            }
            None => {}
        }
        for why in r
            .log
            .checkpoint_skipped
            .iter()
            .filter(|w| !w.ends_with("never written"))
        {
            t += &format!("checkpoint {why}\n");
        }
        for b in &backing {
            t += &format!(
                "backing {}: {:?}, {} bytes, {} dirty lines\n",
                b["id"],
                b["label"].as_str().unwrap_or(""),
                b["size"],
                b["dirty_lines"]
            );
        }
        if let Some(tail) = &r.log.tail {
            t += &format!(
                "log ends at a torn segment ({tail}): a write cut short, never acknowledged as durable; nothing is lost\n"
            );
        }
        match &r.damage {
            None => t += "log intact\n",
            Some(d) => {
                for (id, why) in &r.log.damaged {
                    t += &format!("DAMAGE: segment {id} was durable but fails its checks: {why}\n");
                }
                for (id, n) in &d.lost_lines {
                    let label = r.superblock.backing[*id as usize]
                        .as_ref()
                        .map_or(String::new(), |b| format!(" ({:?})", b.label));
                    t += &format!("DAMAGE: backing {id}{label}: {n} lines lost; reads of them fail until rewritten or `lc accept-loss`\n");
                }
                if d.unknown_upto > 0 {
                    t += &format!(
                        "DAMAGE: segment {}'s header is unreadable: every line not written again after it is refused\n",
                        d.unknown_upto
                    );
                }
                if let Some((seq, n)) = r.log.loss_records {
                    t += &format!("DAMAGE: checkpoint {seq} records {n} lines with lost sectors (found while serving or by an earlier recovery)\n");
                }
            }
        }
        t
    };
    Ok(CheckOutcome { text, clean })
}
