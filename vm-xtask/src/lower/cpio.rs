//! A writer for the cpio "newc" format, which the kernel unpacks into its initial root
//! file system. Times and owners are fixed, so the same entries give the same bytes.

use std::io::{self, Write};

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";

/// Writes entries one after the other; [`CpioWriter::finish`] adds the trailer.
pub struct CpioWriter<W: Write> {
    out: W,
    offset: u64,
    next_ino: u32,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> CpioWriter<W> {
        CpioWriter { out, offset: 0, next_ino: 1 }
    }

    /// A directory; parents must come first.
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        self.entry(path, 0o040000 | perm, 0, &[])
    }

    /// A regular file with the given permission bits.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, 0o100000 | perm, 0, data)
    }

    /// A symbolic link to `target`.
    #[cfg(test)]
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, 0o120777, 0, target.as_bytes())
    }

    /// A character device node (e.g. `/dev/console`, 5:1), which the kernel needs before
    /// it can give `/init` its standard streams.
    pub fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(path, 0o020000 | perm, (major << 8) | minor, &[])
    }

    fn entry(&mut self, path: &str, mode: u32, rdev: u32, data: &[u8]) -> io::Result<()> {
        let name = path.trim_start_matches('/');
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            data.len() as u32,
            0, // devmajor
            0, // devminor
            rdev >> 8,
            rdev & 0xff,
            name.len() as u32 + 1,
            0, // check
        ];
        let mut header = String::from(MAGIC);
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()?;
        self.write(data)?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.offset % 4) as usize) % 4;
        self.write(&[0; 3][..n])
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry(TRAILER, 0, 0, &[])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_newc_headers_names_and_padding() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("/init", 0o755, b"abcde").unwrap();
        let bytes = w.finish().unwrap();
        // header: 6 + 13 * 8 = 110 bytes, then "init\0" (115), padded to 116, 5 data bytes padded to 124.
        assert_eq!(&bytes[..6], b"070701");
        assert_eq!(&bytes[6..14], b"00000001", "inode");
        assert_eq!(&bytes[14..22], b"000081ed", "mode: regular file 0755");
        assert_eq!(&bytes[54..62], b"00000005", "file size");
        assert_eq!(&bytes[94..102], b"00000005", "name size including NUL");
        assert_eq!(&bytes[110..115], b"init\0");
        assert_eq!(&bytes[116..121], b"abcde");
        assert_eq!(&bytes[121..124], &[0, 0, 0]);
        assert_eq!(&bytes[124..130], b"070701");
        assert_eq!(&bytes[124 + 110..124 + 110 + 11], b"TRAILER!!!\0");
        assert_eq!(bytes.len() % 4, 0);
    }

    #[test]
    fn device_numbers_and_symlinks() {
        let mut w = CpioWriter::new(Vec::new());
        w.char_device("/dev/console", 0o600, 5, 1).unwrap();
        w.symlink("/bin/sh", "busybox").unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(&bytes[14..22], b"00002180", "char device 0600");
        assert_eq!(&bytes[78..86], b"00000005", "rdevmajor");
        assert_eq!(&bytes[86..94], b"00000001", "rdevminor");
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("bin/sh\0"));
        assert!(text.contains("busybox"));
    }
}
