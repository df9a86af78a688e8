//! Reading text files the way Python's text mode does, so token ids match reference scripts.

use std::path::Path;

use super::TokenizerError;

/// Read a UTF-8 text file the way Python's text mode does: `\r\n` and a lone `\r` become `\n`
/// (a byte-order mark is kept, as with `encoding="utf-8"`).
///
/// Fails with [`TokenizerError::Io`] for a missing or unreadable file,
/// [`TokenizerError::NotUtf8`] for invalid UTF-8 and [`TokenizerError::EmptyFile`] for a file with
/// no bytes or only whitespace.
pub fn read_text_file(path: &Path) -> Result<String, TokenizerError> {
    let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8(bytes).map_err(|e| TokenizerError::NotUtf8 {
        path: path.to_path_buf(),
        valid_up_to: e.utf8_error().valid_up_to(),
    })?;
    if text.trim().is_empty() {
        return Err(TokenizerError::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    if text.contains('\r') {
        Ok(normalize_newlines(&text))
    } else {
        Ok(text)
    }
}

/// `\r\n` → `\n`, then a lone `\r` → `\n` (Python's universal newlines on read).
pub fn normalize_newlines(text: &str) -> String {
    text.replace("\r\n", "\n").replace('\r', "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_text_file_normalises_newlines() {
        let dir = std::env::temp_dir().join(format!("s2lc-tokenizer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("crlf.txt");
        std::fs::write(&file, b"a\r\nb\rc\n\r\n\r\rd\r").unwrap();
        assert_eq!(read_text_file(&file).unwrap(), "a\nb\nc\n\n\n\nd\n");

        let empty = dir.join("empty.txt");
        for blank in [&b""[..], b" \r\n\t\n"] {
            std::fs::write(&empty, blank).unwrap();
            assert!(matches!(
                read_text_file(&empty),
                Err(TokenizerError::EmptyFile { .. })
            ));
        }

        let latin1 = dir.join("latin1.txt");
        std::fs::write(&latin1, b"caf\xe9").unwrap();
        assert!(matches!(
            read_text_file(&latin1),
            Err(TokenizerError::NotUtf8 { valid_up_to: 3, .. })
        ));

        let missing = dir.join("missing.txt");
        let err = read_text_file(&missing).unwrap_err();
        assert!(matches!(err, TokenizerError::Io { .. }));
        assert!(err.to_string().contains("missing.txt"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
