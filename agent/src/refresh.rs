//! After a snapshot restore every instance wakes with the same RNG state and a stale clock:
//! [`apply`] credits fresh host entropy to the guest RNG, forces the CRNG to reseed from it,
//! and steps the wall clock. VM only — in the process sandbox the kernel (and its RNG and
//! clock) is the host's, which a sandbox must never set.

use std::io;
use std::os::fd::AsRawFd;

/// Why a restored guest's RNG or clock could not be refreshed.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// Hex digits come in pairs.
    #[error("entropy_hex has an odd number of digits")]
    OddHex,
    /// More entropy than a reseed needs.
    #[error("entropy_hex is longer than {MAX_ENTROPY_BYTES} bytes")]
    TooMuchEntropy,
    /// A character that is no hex digit.
    #[error("entropy_hex holds a non-hex character {0:?}")]
    NotHex(char),
    /// /dev/random cannot be opened for writing.
    #[error("cannot open /dev/random: {0}")]
    OpenRandom(io::Error),
    /// RNDADDENTROPY failed.
    #[error("cannot add entropy: {0}")]
    AddEntropy(io::Error),
    /// RNDRESEEDCRNG failed.
    #[error("cannot reseed the CRNG: {0}")]
    Reseed(io::Error),
    /// clock_settime failed.
    #[error("cannot set the clock: {0}")]
    SetClock(io::Error),
}

/// _IOW('R', 0x03, int[2]): add entropy and credit it.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// _IO('R', 0x07): reseed the CRNG now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
/// More than this is pointless for a reseed and would only grow the message.
pub const MAX_ENTROPY_BYTES: usize = 4096;

/// Decodes lowercase or uppercase hex.
pub fn decode_hex(hex: &str) -> Result<Vec<u8>, RefreshError> {
    if hex.len() % 2 != 0 {
        return Err(RefreshError::OddHex);
    }
    if hex.len() / 2 > MAX_ENTROPY_BYTES {
        return Err(RefreshError::TooMuchEntropy);
    }
    let digit = |c: u8| -> Result<u8, RefreshError> {
        (c as char)
            .to_digit(16)
            .map(|d| d as u8)
            .ok_or(RefreshError::NotHex(c as char))
    };
    hex.as_bytes()
        .chunks(2)
        .map(|pair| Ok(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// Reseeds the RNG with `entropy_hex` and sets the clock to `unix_time_ns`.
pub fn apply(entropy_hex: &str, unix_time_ns: u64) -> Result<(), RefreshError> {
    let entropy = decode_hex(entropy_hex)?;
    if !entropy.is_empty() {
        let random = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/random")
            .map_err(RefreshError::OpenRandom)?;
        // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
        let mut info = Vec::with_capacity(8 + entropy.len() + 3);
        info.extend_from_slice(&((entropy.len() * 8) as i32).to_ne_bytes());
        info.extend_from_slice(&(entropy.len() as i32).to_ne_bytes());
        info.extend_from_slice(&entropy);
        info.resize(info.len().div_ceil(4) * 4, 0);
        // SAFETY: RNDADDENTROPY reads the header and buf_size bytes after it, all inside
        // `info`, which lives across the call.
        if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } != 0 {
            return Err(RefreshError::AddEntropy(io::Error::last_os_error()));
        }
        // SAFETY: RNDRESEEDCRNG takes no argument.
        if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
            return Err(RefreshError::Reseed(io::Error::last_os_error()));
        }
    }
    let ts = libc::timespec {
        tv_sec: (unix_time_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_time_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: clock_settime reads one timespec from the stack.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(RefreshError::SetClock(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_decodes_and_bad_hex_is_named() {
        assert_eq!(decode_hex("00ff7A").unwrap(), [0, 255, 0x7a]);
        assert_eq!(decode_hex("").unwrap(), Vec::<u8>::new());
        assert!(decode_hex("abc").unwrap_err().to_string().contains("odd"));
        assert!(decode_hex("zz").unwrap_err().to_string().contains("'z'"));
        assert!(decode_hex(&"00".repeat(MAX_ENTROPY_BYTES + 1))
            .unwrap_err()
            .to_string()
            .contains("longer"));
    }
}
