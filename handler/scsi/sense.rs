//! SCSI status codes and fixed-format sense data (SPC-4 4.5.3).

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

/// (ASC, ASCQ) pairs used here.
pub mod asc {
    /// PARAMETER LIST LENGTH ERROR.
    pub const PARAM_LIST_LENGTH: (u8, u8) = (0x1a, 0x00);
    /// INVALID COMMAND OPERATION CODE.
    pub const INVALID_OPCODE: (u8, u8) = (0x20, 0x00);
    /// LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub const LBA_OUT_OF_RANGE: (u8, u8) = (0x21, 0x00);
    /// INVALID FIELD IN CDB.
    pub const INVALID_FIELD_IN_CDB: (u8, u8) = (0x24, 0x00);
    /// INVALID FIELD IN COMMAND INFORMATION UNIT: the transport's data length does
    /// not match the CDB of a data-out command (what LIO's own backstores answer).
    pub const INVALID_FIELD_IN_IU: (u8, u8) = (0x0e, 0x03);
    /// INVALID FIELD IN PARAMETER LIST.
    pub const INVALID_FIELD_IN_PARAM: (u8, u8) = (0x26, 0x00);
    /// SAVING PARAMETERS NOT SUPPORTED.
    pub const SAVING_NOT_SUPPORTED: (u8, u8) = (0x39, 0x00);
    /// WRITE ERROR.
    pub const WRITE_ERROR: (u8, u8) = (0x0c, 0x00);
    /// UNRECOVERED READ ERROR.
    pub const READ_ERROR: (u8, u8) = (0x11, 0x00);
    /// MISCOMPARE DURING VERIFY OPERATION.
    pub const MISCOMPARE_VERIFY: (u8, u8) = (0x1d, 0x00);
    /// CAPACITY DATA HAS CHANGED.
    pub const CAPACITY_CHANGED: (u8, u8) = (0x2a, 0x09);
    /// COMMAND TIMEOUT BEFORE PROCESSING.
    pub const COMMAND_TIMEOUT_BEFORE_PROCESSING: (u8, u8) = (0x2e, 0x01);
    /// INTERNAL TARGET FAILURE.
    pub const INTERNAL_TARGET_FAILURE: (u8, u8) = (0x44, 0x00);
}

/// Length of the fixed-format sense data we build.
pub const SENSE_LEN: usize = 18;

/// Fixed-format sense data; `info` goes into the INFORMATION field (VALID set) when it
/// fits 32 bits.
pub fn fixed(key: u8, (asc, ascq): (u8, u8), info: Option<u64>) -> Vec<u8> {
    let mut s = vec![0u8; SENSE_LEN];
    s[0] = 0x70;
    s[2] = key & 0x0f;
    if let Some(i) = info.and_then(|i| u32::try_from(i).ok()) {
        s[0] |= 0x80;
        s[3..7].copy_from_slice(&i.to_be_bytes());
    }
    s[7] = (SENSE_LEN - 8) as u8;
    s[12] = asc;
    s[13] = ascq;
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_sense_layout() {
        let s = fixed(key::MEDIUM_ERROR, asc::READ_ERROR, Some(0x1234));
        assert_eq!(s[0], 0xf0);
        assert_eq!(s[2], 3);
        assert_eq!(&s[3..7], &[0, 0, 0x12, 0x34]);
        assert_eq!(s[7], 10);
        assert_eq!((s[12], s[13]), (0x11, 0));
        let s = fixed(key::ILLEGAL_REQUEST, asc::INVALID_OPCODE, Some(1 << 40));
        assert_eq!(s[0], 0x70, "an LBA beyond 32 bits leaves VALID clear");
    }
}
