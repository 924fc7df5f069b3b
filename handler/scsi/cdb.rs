//! CDB parsing: bytes in, once per command, a validated [`Command`] out (or the
//! ILLEGAL REQUEST [`Sense`] to answer). A command knows which way its data moves
//! ([`Command::direction`]) and how many bytes its CDB says move
//! ([`Command::transfer_length`]), so the transport needs no opcode of its own.
//! Block addresses and block counts are their own types ([`Lba`], [`Blocks`]); bytes
//! are plain integers. Field positions follow SPC-4 / SBC-3.

use super::sense::{self, Sense};

/// A logical block address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lba(pub u64);

/// A number of logical blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Blocks(pub u64);

impl Lba {
    /// The byte offset of this block with blocks of `block_size` bytes.
    pub fn offset(self, block_size: u64) -> u64 {
        self.0 * block_size
    }

    /// The block `n` blocks after this one.
    pub fn after(self, n: Blocks) -> Lba {
        Lba(self.0 + n.0)
    }

    /// The block after the last of `n` blocks starting here, unless it overflows.
    pub fn checked_end(self, n: Blocks) -> Option<Lba> {
        self.0.checked_add(n.0).map(Lba)
    }
}

impl Blocks {
    /// Their length in bytes with blocks of `block_size` bytes.
    pub fn bytes(self, block_size: u64) -> u64 {
        self.0 * block_size
    }
}

/// Which way a command's data moves, seen from the initiator (SAM-5 5.4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// No data.
    None,
    /// Data-Out: the initiator sends (write data, parameter lists).
    ToDevice,
    /// Data-In: the initiator receives (read data, reports).
    FromDevice,
}

/// PC, the page control field of MODE SENSE (SPC-4 6.11.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageControl {
    /// Current values.
    Current,
    /// Changeable values (a mask).
    Changeable,
    /// Default values.
    Default,
    /// Saved values (not supported).
    Saved,
}

impl From<u8> for PageControl {
    /// The two bits of byte 2's top.
    fn from(pc: u8) -> PageControl {
        match pc & 0x03 {
            0 => PageControl::Current,
            1 => PageControl::Changeable,
            2 => PageControl::Default,
            _ => PageControl::Saved,
        }
    }
}

/// BYTCHK of VERIFY (SBC-4 5.29; 10b is reserved).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerifyCheck {
    /// 00b: the medium is read, nothing is compared; no Data-Out.
    Medium,
    /// 01b: every block is compared with the Data-Out.
    Compare,
    /// 11b: every block is compared with the one Data-Out block.
    CompareOneBlock,
}

impl TryFrom<u8> for VerifyCheck {
    type Error = Sense;
    fn try_from(b: u8) -> Result<VerifyCheck, Sense> {
        match b {
            0 => Ok(VerifyCheck::Medium),
            1 => Ok(VerifyCheck::Compare),
            3 => Ok(VerifyCheck::CompareOneBlock),
            _ => Err(sense::INVALID_FIELD_IN_CDB),
        }
    }
}

/// BYTCHK of WRITE AND VERIFY (SBC-4 5.41: only 00b and 01b are defined).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteVerifyCheck {
    /// 00b: the written blocks are read back.
    ReadBack,
    /// 01b: read back and compared with the Data-Out.
    Compare,
}

impl TryFrom<u8> for WriteVerifyCheck {
    type Error = Sense;
    fn try_from(b: u8) -> Result<WriteVerifyCheck, Sense> {
        match b {
            0 => Ok(WriteVerifyCheck::ReadBack),
            1 => Ok(WriteVerifyCheck::Compare),
            _ => Err(sense::INVALID_FIELD_IN_CDB),
        }
    }
}

/// REPORTING OPTIONS of REPORT SUPPORTED OPERATION CODES (SPC-4 6.35.1). The CDB
/// keeps the raw field: a reserved value is refused when the command runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportingOptions {
    /// 000b: every command.
    All,
    /// 001b: one command by opcode (an error for one with service actions).
    Opcode,
    /// 010b: one command by opcode and service action.
    OpcodeAndServiceAction,
    /// 011b: one command by opcode, the service action counting if it has them.
    Either,
}

impl TryFrom<u8> for ReportingOptions {
    type Error = Sense;
    fn try_from(b: u8) -> Result<ReportingOptions, Sense> {
        match b {
            0 => Ok(ReportingOptions::All),
            1 => Ok(ReportingOptions::Opcode),
            2 => Ok(ReportingOptions::OpcodeAndServiceAction),
            3 => Ok(ReportingOptions::Either),
            _ => Err(sense::INVALID_FIELD_IN_CDB),
        }
    }
}

/// REPORT TYPE of GET LBA STATUS (SBC-4 5.8). The CDB keeps the raw field: a
/// reserved value is refused when the command runs, after the LBA is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportType {
    /// 0: every block.
    All,
    /// 1: blocks with a nonzero provisioning status.
    NonzeroStatus,
    /// 2: mapped blocks.
    Mapped,
    /// 3: deallocated blocks.
    Deallocated,
    /// 4: anchored blocks.
    Anchored,
}

impl TryFrom<u8> for ReportType {
    type Error = Sense;
    fn try_from(b: u8) -> Result<ReportType, Sense> {
        match b {
            0 => Ok(ReportType::All),
            1 => Ok(ReportType::NonzeroStatus),
            2 => Ok(ReportType::Mapped),
            3 => Ok(ReportType::Deallocated),
            4 => Ok(ReportType::Anchored),
            _ => Err(sense::INVALID_FIELD_IN_CDB),
        }
    }
}

/// A parsed command. Lengths in bytes are `usize`; blocks are [`Lba`] / [`Blocks`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
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
        /// Page control.
        pc: PageControl,
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
        lba: Lba,
        /// Number of blocks.
        blocks: Blocks,
        /// Force unit access.
        fua: bool,
    },
    /// WRITE (6/10/12/16).
    Write {
        /// First block.
        lba: Lba,
        /// Number of blocks.
        blocks: Blocks,
        /// Force unit access.
        fua: bool,
    },
    /// SYNCHRONIZE CACHE (10/16).
    SyncCache {
        /// First block.
        lba: Lba,
        /// Number of blocks (0 = to the end).
        blocks: Blocks,
    },
    /// WRITE SAME (10/16).
    WriteSame {
        /// First block.
        lba: Lba,
        /// Number of blocks.
        blocks: Blocks,
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
        lba: Lba,
        /// Number of blocks.
        blocks: Blocks,
        /// What is compared.
        bytchk: VerifyCheck,
    },
    /// WRITE AND VERIFY (10/12/16).
    WriteVerify {
        /// First block.
        lba: Lba,
        /// Number of blocks.
        blocks: Blocks,
        /// What is compared.
        bytchk: WriteVerifyCheck,
    },
    /// COMPARE AND WRITE.
    CompareAndWrite {
        /// First block.
        lba: Lba,
        /// Number of blocks compared, then written.
        blocks: Blocks,
        /// Force unit access.
        fua: bool,
    },
    /// GET LBA STATUS (SERVICE ACTION IN (16)).
    GetLbaStatus {
        /// First block reported.
        lba: Lba,
        /// Allocation length.
        alloc: usize,
        /// REPORT TYPE, raw ([`ReportType`] when it runs).
        report_type: u8,
    },
    /// REPORT SUPPORTED OPERATION CODES.
    ReportOpcodes {
        /// REPORTING OPTIONS, raw ([`ReportingOptions`] when it runs).
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

impl Command {
    /// Parses a CDB ([`parse`]).
    pub fn parse(cdb: &[u8]) -> Result<Command, Sense> {
        parse(cdb)
    }

    /// Which way the command's data moves.
    pub fn direction(&self) -> Direction {
        use Command as C;
        match self {
            C::TestUnitReady | C::StartStopUnit | C::SyncCache { .. } => Direction::None,
            C::Verify {
                bytchk: VerifyCheck::Medium,
                ..
            } => Direction::None,
            C::WriteSame { ndob: true, .. } => Direction::None,
            C::Write { .. }
            | C::WriteSame { .. }
            | C::Verify { .. }
            | C::WriteVerify { .. }
            | C::CompareAndWrite { .. }
            | C::ModeSelect { .. }
            | C::Unmap { .. }
            | C::ExtendedCopy { .. } => Direction::ToDevice,
            C::Read { .. }
            | C::RequestSense { .. }
            | C::Inquiry { .. }
            | C::ReadCapacity10
            | C::ReadCapacity16 { .. }
            | C::ModeSense { .. }
            | C::GetLbaStatus { .. }
            | C::ReportOpcodes { .. }
            | C::ReceiveCopyOperatingParameters { .. }
            | C::ReportLuns { .. } => Direction::FromDevice,
        }
    }

    /// The bytes the CDB says move (in [`Command::direction`]) with blocks of
    /// `block_size` bytes: a transfer's blocks, a parameter list's length, an
    /// allocation length.
    pub fn transfer_length(&self, block_size: u64) -> u64 {
        use Command as C;
        let bs = block_size;
        match *self {
            C::TestUnitReady | C::StartStopUnit | C::SyncCache { .. } => 0,
            C::Read { blocks, .. } | C::Write { blocks, .. } | C::WriteVerify { blocks, .. } => {
                blocks.bytes(bs)
            }
            C::WriteSame { ndob, .. } => {
                if ndob {
                    0
                } else {
                    bs
                }
            }
            C::Verify { blocks, bytchk, .. } => match bytchk {
                VerifyCheck::Medium => 0,
                VerifyCheck::Compare => blocks.bytes(bs),
                VerifyCheck::CompareOneBlock if blocks.0 == 0 => 0,
                VerifyCheck::CompareOneBlock => bs,
            },
            C::CompareAndWrite { blocks, .. } => 2 * blocks.bytes(bs),
            C::ReadCapacity10 => 8,
            C::ModeSelect { len, .. } | C::Unmap { len } | C::ExtendedCopy { len } => len as u64,
            C::RequestSense { alloc }
            | C::Inquiry { alloc, .. }
            | C::ReadCapacity16 { alloc }
            | C::ModeSense { alloc, .. }
            | C::GetLbaStatus { alloc, .. }
            | C::ReportOpcodes { alloc, .. }
            | C::ReceiveCopyOperatingParameters { alloc }
            | C::ReportLuns { alloc } => alloc as u64,
        }
    }

    /// Whether the command touches the backend (and may block): run it on a worker
    /// unless it can be served without waiting. The others read and write nothing
    /// but the LUN's mode state.
    pub fn needs_backend(&self) -> bool {
        use Command as C;
        matches!(
            self,
            C::Read { .. }
                | C::Write { .. }
                | C::SyncCache { .. }
                | C::WriteSame { .. }
                | C::Unmap { .. }
                | C::Verify { .. }
                | C::WriteVerify { .. }
                | C::CompareAndWrite { .. }
                | C::ExtendedCopy { .. }
        )
    }

    /// The command's name, for logs.
    pub fn name(&self) -> &'static str {
        use Command as C;
        match self {
            C::Read { .. } => "READ",
            C::Write { .. } => "WRITE",
            C::SyncCache { .. } => "SYNCHRONIZE CACHE",
            C::Unmap { .. } => "UNMAP",
            C::TestUnitReady => "TEST UNIT READY",
            C::RequestSense { .. } => "REQUEST SENSE",
            C::Inquiry { .. } => "INQUIRY",
            C::ReadCapacity10 => "READ CAPACITY (10)",
            C::ReadCapacity16 { .. } => "READ CAPACITY (16)",
            C::ModeSense { .. } => "MODE SENSE",
            C::ModeSelect { .. } => "MODE SELECT",
            C::StartStopUnit => "START STOP UNIT",
            C::WriteSame { .. } => "WRITE SAME",
            C::Verify { .. } => "VERIFY",
            C::WriteVerify { .. } => "WRITE AND VERIFY",
            C::CompareAndWrite { .. } => "COMPARE AND WRITE",
            C::GetLbaStatus { .. } => "GET LBA STATUS",
            C::ReportOpcodes { .. } => "REPORT SUPPORTED OPERATION CODES",
            C::ExtendedCopy { .. } => "EXTENDED COPY",
            C::ReceiveCopyOperatingParameters { .. } => "RECEIVE COPY RESULTS",
            C::ReportLuns { .. } => "REPORT LUNS",
        }
    }
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

/// Parses a CDB: the one parse of a command. Errors are the ILLEGAL REQUEST sense to
/// answer (INVALID COMMAND OPERATION CODE, INVALID FIELD IN CDB for a bad field or a
/// CDB shorter than its opcode's).
pub fn parse(c: &[u8]) -> Result<Command, Sense> {
    let opcode = *c.first().ok_or(sense::INVALID_OPCODE)?;
    let need = |n: usize| {
        if c.len() >= n {
            Ok(())
        } else {
            Err(sense::INVALID_FIELD_IN_CDB)
        }
    };
    let rw_protect = |byte1: u8| {
        if byte1 & 0xe0 != 0 {
            Err(sense::INVALID_FIELD_IN_CDB)
        } else {
            Ok(())
        }
    };
    // LBA and TRANSFER LENGTH of the 10-, 12- and 16-byte block command layouts.
    let range10 = || (Lba(be(&c[2..6])), Blocks(be(&c[7..9])));
    let range12 = || (Lba(be(&c[2..6])), Blocks(be(&c[6..10])));
    let range16 = || (Lba(be(&c[2..10])), Blocks(be(&c[10..14])));
    Ok(match opcode {
        op::TEST_UNIT_READY => Command::TestUnitReady,
        op::REQUEST_SENSE => {
            need(6)?;
            Command::RequestSense {
                alloc: c[4] as usize,
            }
        }
        op::INQUIRY => {
            need(6)?;
            if c[1] & 0x02 != 0 {
                return Err(sense::INVALID_FIELD_IN_CDB); // CMDDT is obsolete
            }
            let evpd = c[1] & 1 != 0;
            if !evpd && c[2] != 0 {
                return Err(sense::INVALID_FIELD_IN_CDB);
            }
            Command::Inquiry {
                evpd,
                page: c[2],
                alloc: be(&c[3..5]) as usize,
            }
        }
        op::READ_CAPACITY_10 => Command::ReadCapacity10,
        op::SERVICE_ACTION_IN_16 => {
            need(16)?;
            match c[1] & 0x1f {
                op::SA_READ_CAPACITY_16 => Command::ReadCapacity16 {
                    alloc: be(&c[10..14]) as usize,
                },
                op::SA_GET_LBA_STATUS => Command::GetLbaStatus {
                    lba: Lba(be(&c[2..10])),
                    alloc: be(&c[10..14]) as usize,
                    report_type: c[14],
                },
                _ => return Err(sense::INVALID_FIELD_IN_CDB),
            }
        }
        op::MODE_SENSE_6 | op::MODE_SENSE_10 => {
            let ten = opcode == op::MODE_SENSE_10;
            need(if ten { 10 } else { 6 })?;
            Command::ModeSense {
                page: c[2] & 0x3f,
                subpage: c[3],
                pc: PageControl::from(c[2] >> 6),
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
            Command::ModeSelect {
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
        op::START_STOP_UNIT => Command::StartStopUnit,
        op::READ_6 | op::WRITE_6 => {
            need(6)?;
            let lba = Lba(be(&c[1..4]) & 0x1f_ffff);
            let blocks = Blocks(if c[4] == 0 { 256 } else { c[4] as u64 });
            if opcode == op::READ_6 {
                Command::Read {
                    lba,
                    blocks,
                    fua: false,
                }
            } else {
                Command::Write {
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
                    range10()
                }
                op::READ_12 | op::WRITE_12 => {
                    need(12)?;
                    range12()
                }
                _ => {
                    need(16)?;
                    range16()
                }
            };
            rw_protect(c[1])?;
            let fua = c[1] & 0x08 != 0;
            if matches!(opcode, op::READ_10 | op::READ_12 | op::READ_16) {
                Command::Read { lba, blocks, fua }
            } else {
                Command::Write { lba, blocks, fua }
            }
        }
        op::SYNCHRONIZE_CACHE_10 => {
            need(10)?;
            let (lba, blocks) = range10();
            Command::SyncCache { lba, blocks }
        }
        op::SYNCHRONIZE_CACHE_16 => {
            need(16)?;
            let (lba, blocks) = range16();
            Command::SyncCache { lba, blocks }
        }
        op::WRITE_SAME_10 | op::WRITE_SAME_16 => {
            let ten = opcode == op::WRITE_SAME_10;
            need(if ten { 10 } else { 16 })?;
            rw_protect(c[1])?;
            if c[1] & 0x10 != 0 {
                return Err(sense::INVALID_FIELD_IN_CDB); // ANCHOR: no anchored blocks
            }
            let (lba, blocks) = if ten { range10() } else { range16() };
            Command::WriteSame {
                lba,
                blocks,
                unmap: c[1] & 0x08 != 0,
                ndob: !ten && c[1] & 0x01 != 0,
            }
        }
        op::UNMAP => {
            need(10)?;
            if c[1] & 0x01 != 0 {
                return Err(sense::INVALID_FIELD_IN_CDB); // ANCHOR
            }
            Command::Unmap {
                len: be(&c[7..9]) as usize,
            }
        }
        op::VERIFY_10 | op::VERIFY_16 => {
            let ten = opcode == op::VERIFY_10;
            need(if ten { 10 } else { 16 })?;
            rw_protect(c[1])?;
            let (lba, blocks) = if ten { range10() } else { range16() };
            // DPO is a cache hint, accepted.
            Command::Verify {
                lba,
                blocks,
                bytchk: VerifyCheck::try_from((c[1] >> 1) & 0x03)?,
            }
        }
        op::WRITE_VERIFY_10 | op::WRITE_VERIFY_12 | op::WRITE_VERIFY_16 => {
            let (lba, blocks) = match opcode {
                op::WRITE_VERIFY_10 => {
                    need(10)?;
                    range10()
                }
                op::WRITE_VERIFY_12 => {
                    need(12)?;
                    range12()
                }
                _ => {
                    need(16)?;
                    range16()
                }
            };
            rw_protect(c[1])?;
            Command::WriteVerify {
                lba,
                blocks,
                bytchk: WriteVerifyCheck::try_from((c[1] >> 1) & 0x03)?,
            }
        }
        op::COMPARE_AND_WRITE => {
            need(16)?;
            rw_protect(c[1])?;
            Command::CompareAndWrite {
                lba: Lba(be(&c[2..10])),
                blocks: Blocks(c[13] as u64),
                fua: c[1] & 0x08 != 0,
            }
        }
        op::MAINTENANCE_IN => {
            need(12)?;
            if c[1] & 0x1f != op::SA_REPORT_OPCODES {
                return Err(sense::INVALID_FIELD_IN_CDB);
            }
            Command::ReportOpcodes {
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
                return Err(sense::INVALID_FIELD_IN_CDB); // LID4 is not implemented
            }
            Command::ExtendedCopy {
                len: be(&c[10..14]) as usize,
            }
        }
        op::RECEIVE_COPY_RESULTS => {
            need(16)?;
            // Copies complete before EXTENDED COPY does: there is no status to keep.
            if c[1] & 0x1f != op::SA_RECEIVE_COPY_OPERATING_PARAMETERS {
                return Err(sense::INVALID_FIELD_IN_CDB);
            }
            Command::ReceiveCopyOperatingParameters {
                alloc: be(&c[10..14]) as usize,
            }
        }
        op::REPORT_LUNS => {
            need(12)?;
            Command::ReportLuns {
                alloc: be(&c[6..10]) as usize,
            }
        }
        _ => return Err(sense::INVALID_OPCODE),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_flavours() {
        assert_eq!(
            parse(&[0x08, 0x1f, 0xff, 0xff, 0, 0]).unwrap(),
            Command::Read {
                lba: Lba(0x1f_ffff),
                blocks: Blocks(256),
                fua: false
            }
        );
        assert_eq!(
            parse(&[0x2a, 0x08, 0, 0, 1, 0, 0, 0, 8, 0]).unwrap(),
            Command::Write {
                lba: Lba(256),
                blocks: Blocks(8),
                fua: true
            }
        );
        assert_eq!(
            parse(&[0xa8, 0, 0, 0, 0, 9, 0, 0, 0, 3, 0, 0]).unwrap(),
            Command::Read {
                lba: Lba(9),
                blocks: Blocks(3),
                fua: false
            }
        );
        let mut c16 = [0u8; 16];
        c16[0] = 0x8a;
        c16[2..10].copy_from_slice(&(1u64 << 40).to_be_bytes());
        c16[10..14].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(
            parse(&c16).unwrap(),
            Command::Write {
                lba: Lba(1 << 40),
                blocks: Blocks(7),
                fua: false
            }
        );
        c16[1] = 0x20; // WRPROTECT
        assert_eq!(parse(&c16), Err(sense::INVALID_FIELD_IN_CDB));
        assert_eq!(
            parse(&[0x28, 0, 0]),
            Err(sense::INVALID_FIELD_IN_CDB),
            "short CDB"
        );
        assert_eq!(parse(&[0xc0; 16]), Err(sense::INVALID_OPCODE));
        assert_eq!(parse(&[]), Err(sense::INVALID_OPCODE));
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

    #[test]
    fn every_command_knows_its_direction_and_transfer_length() {
        let bs = 512;
        let read = parse(&build10(op::READ_10, 7, 3, 0)).unwrap();
        assert_eq!(read.direction(), Direction::FromDevice);
        assert_eq!(read.transfer_length(bs), 3 * 512);
        let write = parse(&build16(op::WRITE_16, 7, 3, 0)).unwrap();
        assert_eq!(write.direction(), Direction::ToDevice);
        assert_eq!(write.transfer_length(4096), 3 * 4096);
        // COMPARE AND WRITE: the blocks to compare, then the blocks to write.
        let caw = parse(&build16(op::COMPARE_AND_WRITE, 0, 2, 0)).unwrap();
        assert_eq!(caw.transfer_length(bs), 2 * 2 * 512);
        let sync = parse(&build10(op::SYNCHRONIZE_CACHE_10, 0, 0, 0)).unwrap();
        assert_eq!(
            (sync.direction(), sync.transfer_length(bs)),
            (Direction::None, 0)
        );
        // VERIFY: BYTCHK decides whether there is Data-Out and how much.
        let v = |bytchk: u8, blocks| parse(&build10(op::VERIFY_10, 0, blocks, bytchk << 1));
        assert_eq!(v(0, 4).unwrap().direction(), Direction::None);
        assert_eq!(v(1, 4).unwrap().transfer_length(bs), 4 * 512);
        assert_eq!(v(3, 4).unwrap().transfer_length(bs), 512);
        assert_eq!(v(3, 0).unwrap().transfer_length(bs), 0);
        assert_eq!(v(2, 4), Err(sense::INVALID_FIELD_IN_CDB));
        // WRITE SAME: one block of Data-Out, none with NDOB.
        let ws = parse(&build16(op::WRITE_SAME_16, 0, 9, 0)).unwrap();
        assert_eq!(
            (ws.direction(), ws.transfer_length(bs)),
            (Direction::ToDevice, 512)
        );
        let ndob = parse(&build16(op::WRITE_SAME_16, 0, 9, 0x01)).unwrap();
        assert_eq!(
            (ndob.direction(), ndob.transfer_length(bs)),
            (Direction::None, 0)
        );
        let inq = parse(&[op::INQUIRY, 0, 0, 0, 96, 0]).unwrap();
        assert_eq!(
            (inq.direction(), inq.transfer_length(bs)),
            (Direction::FromDevice, 96)
        );
        let unmap = parse(&[op::UNMAP, 0, 0, 0, 0, 0, 0, 0, 24, 0]).unwrap();
        assert_eq!(
            (unmap.direction(), unmap.transfer_length(bs)),
            (Direction::ToDevice, 24)
        );
        // Every supported command answers both without panicking.
        for s in SUPPORTED {
            let mut c = vec![0u8; s.usage.len()];
            c[0] = s.opcode;
            if let Some(sa) = s.sa {
                c[1] = sa as u8;
            }
            let cmd = parse(&c).unwrap();
            let _ = (cmd.direction(), cmd.transfer_length(4096), cmd.name());
        }
    }

    #[test]
    fn field_enums_refuse_reserved_values() {
        assert_eq!(
            WriteVerifyCheck::try_from(2),
            Err(sense::INVALID_FIELD_IN_CDB)
        );
        assert_eq!(ReportType::try_from(4), Ok(ReportType::Anchored));
        assert_eq!(ReportType::try_from(5), Err(sense::INVALID_FIELD_IN_CDB));
        assert_eq!(ReportingOptions::try_from(3), Ok(ReportingOptions::Either));
        assert_eq!(
            ReportingOptions::try_from(4),
            Err(sense::INVALID_FIELD_IN_CDB)
        );
        assert_eq!(PageControl::from(3), PageControl::Saved);
    }
}
