//! SCSI status codes and fixed-format sense data (SPC-4 4.5.3). Every sense this
//! emulation answers with is a named [`Sense`] constant here (the EXTENDED COPY
//! parameter-list ones are in `xcopy.rs`).

/// GOOD.
pub const GOOD: u8 = 0x00;
/// CHECK CONDITION.
pub const CHECK_CONDITION: u8 = 0x02;

/// Sense keys.
pub mod key {
    /// NO SENSE.
    pub const NO_SENSE: u8 = 0x0;
    /// NOT READY.
    pub const NOT_READY: u8 = 0x2;
    /// MEDIUM ERROR.
    pub const MEDIUM_ERROR: u8 = 0x3;
    /// HARDWARE ERROR.
    pub const HARDWARE_ERROR: u8 = 0x4;
    /// ILLEGAL REQUEST.
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    /// UNIT ATTENTION.
    pub const UNIT_ATTENTION: u8 = 0x6;
    /// ABORTED COMMAND.
    pub const ABORTED_COMMAND: u8 = 0xb;
    /// COPY ABORTED.
    pub const COPY_ABORTED: u8 = 0xa;
    /// MISCOMPARE.
    pub const MISCOMPARE: u8 = 0xe;
}

/// A sense triple: sense key, additional sense code and its qualifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    /// Sense key ([`key`]).
    pub key: u8,
    /// ADDITIONAL SENSE CODE.
    pub asc: u8,
    /// ADDITIONAL SENSE CODE QUALIFIER.
    pub ascq: u8,
}

impl Sense {
    /// The triple `key`, `asc`/`ascq`.
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Sense {
        Sense { key, asc, ascq }
    }

    /// Fixed-format sense data of this triple; `info` goes into the INFORMATION field
    /// (VALID set) when it fits 32 bits.
    pub fn fixed(self, info: Option<u64>) -> Vec<u8> {
        let mut s = vec![0u8; SENSE_LEN];
        s[0] = 0x70;
        s[2] = self.key & 0x0f;
        if let Some(i) = info.and_then(|i| u32::try_from(i).ok()) {
            s[0] |= 0x80;
            s[3..7].copy_from_slice(&i.to_be_bytes());
        }
        s[7] = (SENSE_LEN - 8) as u8;
        s[12] = self.asc;
        s[13] = self.ascq;
        s
    }
}

/// NO SENSE: what REQUEST SENSE reports (no sense is kept pending).
pub const NO_SENSE: Sense = Sense::new(key::NO_SENSE, 0x00, 0x00);
/// ILLEGAL REQUEST / PARAMETER LIST LENGTH ERROR.
pub const PARAMETER_LIST_LENGTH_ERROR: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x1a, 0x00);
/// ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE.
pub const INVALID_OPCODE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00);
/// ILLEGAL REQUEST / LOGICAL BLOCK ADDRESS OUT OF RANGE.
pub const LBA_OUT_OF_RANGE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00);
/// ILLEGAL REQUEST / INVALID FIELD IN CDB.
pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00);
/// ILLEGAL REQUEST / INVALID FIELD IN COMMAND INFORMATION UNIT: the transport's data
/// length does not match the CDB of a data-out command (what LIO's own backstores
/// answer).
pub const INVALID_FIELD_IN_IU: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x0e, 0x03);
/// ILLEGAL REQUEST / INVALID FIELD IN PARAMETER LIST.
pub const INVALID_FIELD_IN_PARAMETER_LIST: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x00);
/// ILLEGAL REQUEST / SAVING PARAMETERS NOT SUPPORTED.
pub const SAVING_PARAMETERS_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x39, 0x00);
/// MEDIUM ERROR / WRITE ERROR: the medium failed a write, a discard or a flush.
pub const WRITE_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x0c, 0x00);
/// MEDIUM ERROR / UNRECOVERED READ ERROR: the medium failed a read.
pub const UNRECOVERED_READ_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x11, 0x00);
/// HARDWARE ERROR / INTERNAL TARGET FAILURE: the target itself cannot serve the
/// command (a failed cache, a malformed ring entry).
pub const INTERNAL_TARGET_FAILURE: Sense = Sense::new(key::HARDWARE_ERROR, 0x44, 0x00);
/// MISCOMPARE / MISCOMPARE DURING VERIFY OPERATION.
pub const MISCOMPARE_DURING_VERIFY: Sense = Sense::new(key::MISCOMPARE, 0x1d, 0x00);
/// UNIT ATTENTION / CAPACITY DATA HAS CHANGED.
pub const CAPACITY_DATA_CHANGED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x09);
/// ABORTED COMMAND / COMMAND TIMEOUT BEFORE PROCESSING.
pub const COMMAND_TIMEOUT_BEFORE_PROCESSING: Sense = Sense::new(key::ABORTED_COMMAND, 0x2e, 0x01);

/// Length of the fixed-format sense data we build.
pub const SENSE_LEN: usize = 18;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_sense_layout() {
        let s = UNRECOVERED_READ_ERROR.fixed(Some(0x1234));
        assert_eq!(s[0], 0xf0);
        assert_eq!(s[2], 3);
        assert_eq!(&s[3..7], &[0, 0, 0x12, 0x34]);
        assert_eq!(s[7], 10);
        assert_eq!((s[12], s[13]), (0x11, 0));
        let s = INVALID_OPCODE.fixed(Some(1 << 40));
        assert_eq!(s[0], 0x70, "an LBA beyond 32 bits leaves VALID clear");
    }
}
