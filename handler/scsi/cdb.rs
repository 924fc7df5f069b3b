//! CDB parsing: bytes in, a validated [`Cdb`] out (or the ASC/ASCQ of an ILLEGAL
//! REQUEST). Field positions follow SPC-4 / SBC-3.

use super::sense::asc;

/// A parsed command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cdb {
    /// TEST UNIT READY.
    TestUnitReady,
    /// REQUEST SENSE.
    RequestSense {
        /// Allocation length.
        alloc: usize,
    },
    /// INQUIRY.
    Inquiry {
        /// Vital product data requested.
        evpd: bool,
        /// VPD page code.
        page: u8,
        /// Allocation length.
        alloc: usize,
    },
    /// READ CAPACITY (10).
    ReadCapacity10,
    /// READ CAPACITY (16).
    ReadCapacity16 {
        /// Allocation length.
        alloc: usize,
    },
    /// MODE SENSE (6) / (10).
    ModeSense {
        /// Page code.
        page: u8,
        /// Subpage code.
        subpage: u8,
        /// Page control: 0 current, 1 changeable, 2 default, 3 saved.
        pc: u8,
        /// Disable block descriptors.
        dbd: bool,
        /// Allocation length.
        alloc: usize,
        /// The 10-byte form.
        ten: bool,
    },
    /// MODE SELECT (6) / (10).
    ModeSelect {
        /// Page format.
        pf: bool,
        /// Save pages.
        sp: bool,
        /// Parameter list length.
        len: usize,
        /// The 10-byte form.
        ten: bool,
    },
    /// START STOP UNIT.
    StartStopUnit,
    /// READ (6/10/12/16).
    Read {
        /// First block.
        lba: u64,
        /// Number of blocks.
        blocks: u64,
        /// Force unit access.
        fua: bool,
    },
    /// WRITE (6/10/12/16).
    Write {
        /// First block.
        lba: u64,
        /// Number of blocks.
        blocks: u64,
        /// Force unit access.
        fua: bool,
    },
    /// SYNCHRONIZE CACHE (10/16).
    SyncCache {
        /// First block.
        lba: u64,
        /// Number of blocks (0 = to the end).
        blocks: u64,
    },
    /// WRITE SAME (10/16).
    WriteSame {
        /// First block.
        lba: u64,
        /// Number of blocks.
        blocks: u64,
        /// UNMAP bit.
        unmap: bool,
        /// No data-out buffer (16 only): the block is zeros.
        ndob: bool,
    },
    /// UNMAP.
    Unmap {
        /// Parameter list length.
        len: usize,
    },
    /// VERIFY (10/16).
    Verify {
        /// First block.
        lba: u64,
        /// Number of blocks.
        blocks: u64,
        /// BYTCHK field: 0 medium check only, 1 compare with Data-Out, 3 compare
        /// every block with the one Data-Out block.
        bytchk: u8,
    },
    /// WRITE AND VERIFY (10/12/16).
    WriteVerify {
        /// First block.
        lba: u64,
        /// Number of blocks.
        blocks: u64,
        /// BYTCHK field: 0 read back only, 1 read back and compare with Data-Out.
        bytchk: u8,
    },
    /// COMPARE AND WRITE.
    CompareAndWrite {
        /// First block.
        lba: u64,
        /// Number of blocks compared, then written.
        blocks: u64,
        /// Force unit access.
        fua: bool,
    },
    /// GET LBA STATUS (SERVICE ACTION IN (16)).
    GetLbaStatus {
        /// First block reported.
        lba: u64,
        /// Allocation length.
        alloc: usize,
        /// REPORT TYPE (SBC-4): 0 all, 1 not mapped, 2 mapped, 3 deallocated, 4 anchored.
        report_type: u8,
    },
    /// REPORT SUPPORTED OPERATION CODES.
    ReportOpcodes {
        /// Reporting options.
        options: u8,
        /// Requested operation code.
        opcode: u8,
        /// Requested service action.
        sa: u16,
        /// Return command timeouts descriptors.
        rctd: bool,
        /// Allocation length.
        alloc: usize,
    },
    /// EXTENDED COPY (LID1).
    ExtendedCopy {
        /// Parameter list length.
        len: usize,
    },
    /// RECEIVE COPY RESULTS, OPERATING PARAMETERS.
    ReceiveCopyOperatingParameters {
        /// Allocation length.
        alloc: usize,
    },
    /// REPORT LUNS (normally answered by LIO itself).
    ReportLuns {
        /// Allocation length.
        alloc: usize,
    },
}

/// Opcodes (SPC-4 / SBC-3).
pub mod op {
    #![allow(missing_docs)]
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const WRITE_VERIFY_10: u8 = 0x2e;
    pub const VERIFY_10: u8 = 0x2f;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const EXTENDED_COPY: u8 = 0x83;
    pub const RECEIVE_COPY_RESULTS: u8 = 0x84;
    pub const WRITE_16: u8 = 0x8a;
    pub const WRITE_VERIFY_16: u8 = 0x8e;
    pub const VERIFY_16: u8 = 0x8f;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const MAINTENANCE_IN: u8 = 0xa3;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    pub const WRITE_VERIFY_12: u8 = 0xae;
    pub const SA_READ_CAPACITY_16: u8 = 0x10;
    pub const SA_GET_LBA_STATUS: u8 = 0x12;
    pub const SA_EXTENDED_COPY_LID1: u8 = 0x00;
    pub const SA_RECEIVE_COPY_OPERATING_PARAMETERS: u8 = 0x03;
    pub const SA_REPORT_OPCODES: u8 = 0x0c;
}

/// One command we implement, for REPORT SUPPORTED OPERATION CODES.
#[derive(Clone, Copy, Debug)]
pub struct Supported {
    /// Operation code.
    pub opcode: u8,
    /// Service action, for commands that have them.
    pub sa: Option<u16>,
    /// CDB USAGE DATA (SPC-4 6.35.3): the CDB length, with a bit set for every CDB bit
    /// this implementation looks at (byte 0 the opcode, the service action in place).
    pub usage: &'static [u8],
}

const fn cmd(opcode: u8, usage: &'static [u8]) -> Supported {
    Supported {
        opcode,
        sa: None,
        usage,
    }
}

const fn sa_cmd(opcode: u8, sa: u8, usage: &'static [u8]) -> Supported {
    Supported {
        opcode,
        sa: Some(sa as u16),
        usage,
    }
}

const F: u8 = 0xff;

/// Every command we implement. The control byte reads 0: NACA is not supported.
pub const SUPPORTED: &[Supported] = &[
    cmd(op::TEST_UNIT_READY, &[0x00, 0, 0, 0, 0, 0]),
    cmd(op::REQUEST_SENSE, &[0x03, 0, 0, 0, F, 0]),
    cmd(op::READ_6, &[0x08, 0x1f, F, F, F, 0]),
    cmd(op::WRITE_6, &[0x0a, 0x1f, F, F, F, 0]),
    cmd(op::INQUIRY, &[0x12, 0x01, F, F, F, 0]),
    cmd(op::MODE_SELECT_6, &[0x15, 0x11, 0, 0, F, 0]),
    cmd(op::MODE_SENSE_6, &[0x1a, 0x08, F, F, F, 0]),
    cmd(op::START_STOP_UNIT, &[0x1b, 0, 0, 0, 0, 0]),
    cmd(op::READ_CAPACITY_10, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
    cmd(op::READ_10, &[0x28, 0x18, F, F, F, F, 0, F, F, 0]),
    cmd(op::WRITE_10, &[0x2a, 0x18, F, F, F, F, 0, F, F, 0]),
    cmd(op::WRITE_VERIFY_10, &[0x2e, 0x12, F, F, F, F, 0, F, F, 0]),
    cmd(op::VERIFY_10, &[0x2f, 0x16, F, F, F, F, 0, F, F, 0]),
    cmd(op::SYNCHRONIZE_CACHE_10, &[0x35, 0, F, F, F, F, 0, F, F, 0]),
    cmd(op::WRITE_SAME_10, &[0x41, 0x08, F, F, F, F, 0, F, F, 0]),
    cmd(op::UNMAP, &[0x42, 0, 0, 0, 0, 0, 0, F, F, 0]),
    cmd(op::MODE_SELECT_10, &[0x55, 0x11, 0, 0, 0, 0, 0, F, F, 0]),
    cmd(op::MODE_SENSE_10, &[0x5a, 0x08, F, F, 0, 0, 0, F, F, 0]),
    sa_cmd(
        op::EXTENDED_COPY,
        op::SA_EXTENDED_COPY_LID1,
        &[0x83, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, F, F, F, F, 0, 0],
    ),
    sa_cmd(
        op::RECEIVE_COPY_RESULTS,
        op::SA_RECEIVE_COPY_OPERATING_PARAMETERS,
        &[0x84, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, F, F, F, F, 0, 0],
    ),
    cmd(
        op::READ_16,
        &[0x88, 0x18, F, F, F, F, F, F, F, F, F, F, F, F, 0, 0],
    ),
    cmd(
        op::COMPARE_AND_WRITE,
        &[0x89, 0x18, F, F, F, F, F, F, F, F, 0, 0, 0, F, 0, 0],
    ),
    cmd(
        op::WRITE_16,
        &[0x8a, 0x18, F, F, F, F, F, F, F, F, F, F, F, F, 0, 0],
    ),
    cmd(
        op::WRITE_VERIFY_16,
        &[0x8e, 0x12, F, F, F, F, F, F, F, F, F, F, F, F, 0, 0],
    ),
    cmd(
        op::VERIFY_16,
        &[0x8f, 0x16, F, F, F, F, F, F, F, F, F, F, F, F, 0, 0],
    ),
    cmd(
        op::SYNCHRONIZE_CACHE_16,
        &[0x91, 0, F, F, F, F, F, F, F, F, F, F, F, F, 0, 0],
    ),
    cmd(
        op::WRITE_SAME_16,
        &[0x93, 0x09, F, F, F, F, F, F, F, F, F, F, F, F, 0, 0],
    ),
    sa_cmd(
        op::SERVICE_ACTION_IN_16,
        op::SA_READ_CAPACITY_16,
        &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, F, F, F, F, 0, 0],
    ),
    sa_cmd(
        op::SERVICE_ACTION_IN_16,
        op::SA_GET_LBA_STATUS,
        &[0x9e, 0x12, F, F, F, F, F, F, F, F, F, F, F, F, 0x07, 0],
    ),
    cmd(op::REPORT_LUNS, &[0xa0, 0, F, 0, 0, 0, F, F, F, F, 0, 0]),
    sa_cmd(
        op::MAINTENANCE_IN,
        op::SA_REPORT_OPCODES,
        &[0xa3, 0x0c, 0x87, F, F, F, F, F, F, F, 0, 0],
    ),
    cmd(op::READ_12, &[0xa8, 0x18, F, F, F, F, F, F, F, F, 0, 0]),
    cmd(op::WRITE_12, &[0xaa, 0x18, F, F, F, F, F, F, F, F, 0, 0]),
    cmd(
        op::WRITE_VERIFY_12,
        &[0xae, 0x12, F, F, F, F, F, F, F, F, 0, 0],
    ),
];

/// Builds a 16-byte CDB of the READ(16)/WRITE(16) shape (LBA in bytes 2-9, length in
/// 10-13), for initiator-side tools, tests and benchmarks.
pub fn build16(opcode: u8, lba: u64, blocks: u32, flags: u8) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = opcode;
    c[1] = flags;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// Builds a 10-byte CDB of the READ(10)/WRITE(10) shape (LBA in bytes 2-5, length in 7-8).
pub fn build10(opcode: u8, lba: u32, blocks: u16, flags: u8) -> Vec<u8> {
    let mut c = vec![0u8; 10];
    c[0] = opcode;
    c[1] = flags;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn be(b: &[u8]) -> u64 {
    b.iter().fold(0u64, |a, &x| (a << 8) | x as u64)
}

/// Parses a CDB. Errors are ILLEGAL REQUEST ASC/ASCQ pairs.
pub fn parse(c: &[u8]) -> Result<Cdb, (u8, u8)> {
    let opcode = *c.first().ok_or(asc::INVALID_OPCODE)?;
    let need = |n: usize| {
        if c.len() >= n {
            Ok(())
        } else {
            Err(asc::INVALID_FIELD_IN_CDB)
        }
    };
    let rw_protect = |byte1: u8| {
        if byte1 & 0xe0 != 0 {
            Err(asc::INVALID_FIELD_IN_CDB)
        } else {
            Ok(())
        }
    };
    Ok(match opcode {
        op::TEST_UNIT_READY => Cdb::TestUnitReady,
        op::REQUEST_SENSE => {
            need(6)?;
            Cdb::RequestSense {
                alloc: c[4] as usize,
            }
        }
        op::INQUIRY => {
            need(6)?;
            if c[1] & 0x02 != 0 {
                return Err(asc::INVALID_FIELD_IN_CDB); // CMDDT is obsolete
            }
            let evpd = c[1] & 1 != 0;
            if !evpd && c[2] != 0 {
                return Err(asc::INVALID_FIELD_IN_CDB);
            }
            Cdb::Inquiry {
                evpd,
                page: c[2],
                alloc: be(&c[3..5]) as usize,
            }
        }
        op::READ_CAPACITY_10 => Cdb::ReadCapacity10,
        op::SERVICE_ACTION_IN_16 => {
            need(16)?;
            match c[1] & 0x1f {
                op::SA_READ_CAPACITY_16 => Cdb::ReadCapacity16 {
                    alloc: be(&c[10..14]) as usize,
                },
                op::SA_GET_LBA_STATUS => Cdb::GetLbaStatus {
                    lba: be(&c[2..10]),
                    alloc: be(&c[10..14]) as usize,
                    report_type: c[14],
                },
                _ => return Err(asc::INVALID_FIELD_IN_CDB),
            }
        }
        op::MODE_SENSE_6 | op::MODE_SENSE_10 => {
            let ten = opcode == op::MODE_SENSE_10;
            need(if ten { 10 } else { 6 })?;
            Cdb::ModeSense {
                page: c[2] & 0x3f,
                subpage: c[3],
                pc: c[2] >> 6,
                dbd: c[1] & 0x08 != 0,
                alloc: if ten {
                    be(&c[7..9]) as usize
                } else {
                    c[4] as usize
                },
                ten,
            }
        }
        op::MODE_SELECT_6 | op::MODE_SELECT_10 => {
            let ten = opcode == op::MODE_SELECT_10;
            need(if ten { 10 } else { 6 })?;
            Cdb::ModeSelect {
                pf: c[1] & 0x10 != 0,
                sp: c[1] & 0x01 != 0,
                len: if ten {
                    be(&c[7..9]) as usize
                } else {
                    c[4] as usize
                },
                ten,
            }
        }
        op::START_STOP_UNIT => Cdb::StartStopUnit,
        op::READ_6 | op::WRITE_6 => {
            need(6)?;
            let lba = be(&c[1..4]) & 0x1f_ffff;
            let blocks = if c[4] == 0 { 256 } else { c[4] as u64 };
            if opcode == op::READ_6 {
                Cdb::Read {
                    lba,
                    blocks,
                    fua: false,
                }
            } else {
                Cdb::Write {
                    lba,
                    blocks,
                    fua: false,
                }
            }
        }
        op::READ_10 | op::WRITE_10 | op::READ_12 | op::WRITE_12 | op::READ_16 | op::WRITE_16 => {
            let (lba, blocks) = match opcode {
                op::READ_10 | op::WRITE_10 => {
                    need(10)?;
                    (be(&c[2..6]), be(&c[7..9]))
                }
                op::READ_12 | op::WRITE_12 => {
                    need(12)?;
                    (be(&c[2..6]), be(&c[6..10]))
                }
                _ => {
                    need(16)?;
                    (be(&c[2..10]), be(&c[10..14]))
                }
            };
            rw_protect(c[1])?;
            let fua = c[1] & 0x08 != 0;
            if matches!(opcode, op::READ_10 | op::READ_12 | op::READ_16) {
                Cdb::Read { lba, blocks, fua }
            } else {
                Cdb::Write { lba, blocks, fua }
            }
        }
        op::SYNCHRONIZE_CACHE_10 => {
            need(10)?;
            Cdb::SyncCache {
                lba: be(&c[2..6]),
                blocks: be(&c[7..9]),
            }
        }
        op::SYNCHRONIZE_CACHE_16 => {
            need(16)?;
            Cdb::SyncCache {
                lba: be(&c[2..10]),
                blocks: be(&c[10..14]),
            }
        }
        op::WRITE_SAME_10 | op::WRITE_SAME_16 => {
            let ten = opcode == op::WRITE_SAME_10;
            need(if ten { 10 } else { 16 })?;
            rw_protect(c[1])?;
            if c[1] & 0x10 != 0 {
                return Err(asc::INVALID_FIELD_IN_CDB); // ANCHOR: no anchored blocks
            }
            let (lba, blocks) = if ten {
                (be(&c[2..6]), be(&c[7..9]))
            } else {
                (be(&c[2..10]), be(&c[10..14]))
            };
            Cdb::WriteSame {
                lba,
                blocks,
                unmap: c[1] & 0x08 != 0,
                ndob: !ten && c[1] & 0x01 != 0,
            }
        }
        op::UNMAP => {
            need(10)?;
            if c[1] & 0x01 != 0 {
                return Err(asc::INVALID_FIELD_IN_CDB); // ANCHOR
            }
            Cdb::Unmap {
                len: be(&c[7..9]) as usize,
            }
        }
        op::VERIFY_10 | op::VERIFY_16 => {
            let ten = opcode == op::VERIFY_10;
            need(if ten { 10 } else { 16 })?;
            rw_protect(c[1])?;
            let (lba, blocks) = if ten {
                (be(&c[2..6]), be(&c[7..9]))
            } else {
                (be(&c[2..10]), be(&c[10..14]))
            };
            // BYTCHK 10b is reserved (SBC-4 5.29); DPO is a cache hint, accepted.
            let bytchk = (c[1] >> 1) & 0x03;
            if bytchk == 2 {
                return Err(asc::INVALID_FIELD_IN_CDB);
            }
            Cdb::Verify {
                lba,
                blocks,
                bytchk,
            }
        }
        op::WRITE_VERIFY_10 | op::WRITE_VERIFY_12 | op::WRITE_VERIFY_16 => {
            let (lba, blocks) = match opcode {
                op::WRITE_VERIFY_10 => {
                    need(10)?;
                    (be(&c[2..6]), be(&c[7..9]))
                }
                op::WRITE_VERIFY_12 => {
                    need(12)?;
                    (be(&c[2..6]), be(&c[6..10]))
                }
                _ => {
                    need(16)?;
                    (be(&c[2..10]), be(&c[10..14]))
                }
            };
            rw_protect(c[1])?;
            // Only 00b and 01b are defined for WRITE AND VERIFY (SBC-4 5.41).
            let bytchk = (c[1] >> 1) & 0x03;
            if bytchk > 1 {
                return Err(asc::INVALID_FIELD_IN_CDB);
            }
            Cdb::WriteVerify {
                lba,
                blocks,
                bytchk,
            }
        }
        op::COMPARE_AND_WRITE => {
            need(16)?;
            rw_protect(c[1])?;
            Cdb::CompareAndWrite {
                lba: be(&c[2..10]),
                blocks: c[13] as u64,
                fua: c[1] & 0x08 != 0,
            }
        }
        op::MAINTENANCE_IN => {
            need(12)?;
            if c[1] & 0x1f != op::SA_REPORT_OPCODES {
                return Err(asc::INVALID_FIELD_IN_CDB);
            }
            Cdb::ReportOpcodes {
                options: c[2] & 0x07,
                opcode: c[3],
                sa: be(&c[4..6]) as u16,
                rctd: c[2] & 0x80 != 0,
                alloc: be(&c[6..10]) as usize,
            }
        }
        op::EXTENDED_COPY => {
            need(16)?;
            if c[1] & 0x1f != op::SA_EXTENDED_COPY_LID1 {
                return Err(asc::INVALID_FIELD_IN_CDB); // LID4 is not implemented
            }
            Cdb::ExtendedCopy {
                len: be(&c[10..14]) as usize,
            }
        }
        op::RECEIVE_COPY_RESULTS => {
            need(16)?;
            // Copies complete before EXTENDED COPY does: there is no status to keep.
            if c[1] & 0x1f != op::SA_RECEIVE_COPY_OPERATING_PARAMETERS {
                return Err(asc::INVALID_FIELD_IN_CDB);
            }
            Cdb::ReceiveCopyOperatingParameters {
                alloc: be(&c[10..14]) as usize,
            }
        }
        op::REPORT_LUNS => {
            need(12)?;
            Cdb::ReportLuns {
                alloc: be(&c[6..10]) as usize,
            }
        }
        _ => return Err(asc::INVALID_OPCODE),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_flavours() {
        assert_eq!(
            parse(&[0x08, 0x1f, 0xff, 0xff, 0, 0]).unwrap(),
            Cdb::Read {
                lba: 0x1f_ffff,
                blocks: 256,
                fua: false
            }
        );
        assert_eq!(
            parse(&[0x2a, 0x08, 0, 0, 1, 0, 0, 0, 8, 0]).unwrap(),
            Cdb::Write {
                lba: 256,
                blocks: 8,
                fua: true
            }
        );
        assert_eq!(
            parse(&[0xa8, 0, 0, 0, 0, 9, 0, 0, 0, 3, 0, 0]).unwrap(),
            Cdb::Read {
                lba: 9,
                blocks: 3,
                fua: false
            }
        );
        let mut c16 = [0u8; 16];
        c16[0] = 0x8a;
        c16[2..10].copy_from_slice(&(1u64 << 40).to_be_bytes());
        c16[10..14].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(
            parse(&c16).unwrap(),
            Cdb::Write {
                lba: 1 << 40,
                blocks: 7,
                fua: false
            }
        );
        c16[1] = 0x20; // WRPROTECT
        assert_eq!(parse(&c16), Err(asc::INVALID_FIELD_IN_CDB));
        assert_eq!(
            parse(&[0x28, 0, 0]),
            Err(asc::INVALID_FIELD_IN_CDB),
            "short CDB"
        );
        assert_eq!(parse(&[0xc0; 16]), Err(asc::INVALID_OPCODE));
        assert_eq!(parse(&[]), Err(asc::INVALID_OPCODE));
    }

    #[test]
    fn every_supported_opcode_parses_with_its_length() {
        for s in SUPPORTED {
            let mut c = vec![0u8; s.usage.len()];
            c[0] = s.opcode;
            if let Some(sa) = s.sa {
                c[1] = sa as u8;
            }
            assert!(parse(&c).is_ok(), "opcode {:#x}", s.opcode);
            assert_eq!(s.usage[0], s.opcode);
            if let Some(sa) = s.sa {
                assert_eq!(s.usage[1] & 0x1f, sa as u8, "usage data carries the SA");
            }
            // The parser reads no more bytes than the reported CDB length.
            assert!(parse(&c[..c.len() - 1]).is_err() || c.len() <= 6 || s.opcode == 0x25);
        }
    }
}
