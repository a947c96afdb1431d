//! Tokenization: Hugging Face `tokenizer.json` files and GPT-2-style BPE vocabularies embedded
//! in GGUF files, both through the `tokenizers` crate, plus ChatML chat templates.
//!
//! A GGUF vocabulary (`tokenizer.ggml.tokens` + `tokenizer.ggml.merges`) is turned into a
//! byte-level BPE whose pre-tokenizer is chosen from `tokenizer.ggml.pre`, mirroring the
//! pre-tokenizer of the original Hugging Face tokenizer:
//!
//! | `tokenizer.ggml.pre` | pre-tokenizer |
//! | --- | --- |
//! | `smollm` | `Digits(individual) + ByteLevel(regex)` (SmolLM / SmolLM2) |
//! | `gpt2`, `default` | `ByteLevel(regex)` |
//! | `llama-bpe`, `llama3` | Llama-3 split regex + `ByteLevel` |
//! | `qwen2` | Qwen2 split regex + `ByteLevel` |
//!
//! Other values are rejected with [`TokenizerError::UnsupportedPreTokenizer`] rather than
//! tokenizing subtly differently from the model's training. Control and user-defined tokens
//! (GGUF token types 3 and 4) become special added tokens, so `<|im_start|>` in a prompt maps to
//! its single id.
//!
//! # Example
//!
//! ```
//! use bitstack_examples::tokenizer::{ChatMessage, ChatTemplate};
//!
//! let template = ChatTemplate::detect(
//!     "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + \
//!      message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}\
//!      {% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
//! )
//! .unwrap();
//! let prompt = template.render(&[ChatMessage { role: "user", content: "Hi" }], true);
//! assert_eq!(prompt, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
//! ```

use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::gguf::{GgufError, GgufFile};

/// The Llama-3 pre-tokenizer split pattern (llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3`).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The Qwen2 pre-tokenizer split pattern (single digits).
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (`tokenizer.ggml.token_type`) that are special added tokens.
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Errors from building or using a tokenizer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// Reading the GGUF metadata failed.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An error reported by the `tokenizers` crate.
    #[error("tokenizers: {0}")]
    Library(String),
    /// A GGUF tokenizer model other than `gpt2` (e.g. SentencePiece `llama`).
    #[error("unsupported GGUF tokenizer model {0:?} (supported: gpt2)")]
    UnsupportedModel(String),
    /// A `tokenizer.ggml.pre` value with no known mapping.
    #[error("unsupported GGUF pre-tokenizer {0:?} (supported: smollm, gpt2, default, llama-bpe, llama3, qwen2)")]
    UnsupportedPreTokenizer(String),
    /// Inconsistent vocabulary data.
    #[error("bad vocabulary: {0}")]
    BadVocab(String),
    /// The model has no chat template.
    #[error("the model has no chat template")]
    NoChatTemplate,
    /// A chat template this crate does not implement.
    #[error("unsupported chat template (only ChatML-style templates are implemented)")]
    UnsupportedChatTemplate,
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    BadTokenId {
        /// The id.
        id: u32,
        /// The vocabulary size.
        vocab: usize,
    },
}

/// The document [`Tokenizer::to_json`] writes into a stack file. The fields are in
/// alphabetical order, the order the document had when it was a `serde_json::Value`, so
/// files keep their bytes.
#[derive(serde::Serialize)]
struct TokenizerDoc<'a> {
    add_bos: bool,
    bos_id: Option<u32>,
    chat_template: Option<&'a str>,
    eos_id: Option<u32>,
    format: &'static str,
    /// The `tokenizers` library's own JSON, as one string.
    tokenizer: &'a str,
}

fn lib_err(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Library(e.to_string())
}

/// One chat turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChatMessage<'a> {
    /// `system`, `user` or `assistant`.
    pub role: &'a str,
    /// The message text.
    pub content: &'a str,
}

/// A recognised chat template.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChatTemplate {
    /// ChatML: `<|im_start|>{role}\n{content}<|im_end|>\n` per message, then
    /// `<|im_start|>assistant\n` as generation prompt.
    ChatMl {
        /// A system turn (complete, with its markers) the template inserts when the first
        /// message is not a system message (SmolLM2 does this).
        default_system: Option<String>,
    },
}

impl ChatTemplate {
    /// Recognises a Jinja chat template source. Only ChatML-style templates are implemented;
    /// anything else is [`TokenizerError::UnsupportedChatTemplate`] rather than a guess.
    pub fn detect(source: &str) -> Result<Self, TokenizerError> {
        let compact = normalize_jinja(source);
        let per_message = compact
            .contains("'<|im_start|>'+message['role']+'\\n'+message['content']+'<|im_end|>'+'\\n'")
            || compact.contains(
                "'<|im_start|>'+message['role']+'\\n'+message['content']+'<|im_end|>\\n'",
            );
        let gen_prompt =
            compact.contains("{%ifadd_generation_prompt%}{{'<|im_start|>assistant\\n'}}");
        if !(per_message && gen_prompt) {
            return Err(TokenizerError::UnsupportedChatTemplate);
        }
        // SmolLM2-style default system prompt:
        // {% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n...' }}
        let marker = "messages[0]['role']!='system'%}{{'";
        let default_system = match compact.find(marker) {
            None => None,
            Some(at) => {
                let lit = &compact[at + marker.len()..];
                let end = lit
                    .find("'}}")
                    .ok_or(TokenizerError::UnsupportedChatTemplate)?;
                Some(jinja_unescape(&lit[..end]))
            }
        };
        Ok(Self::ChatMl { default_system })
    }

    /// Renders a conversation.
    pub fn render(&self, messages: &[ChatMessage<'_>], add_generation_prompt: bool) -> String {
        let Self::ChatMl { default_system } = self;
        let mut out = String::new();
        if let Some(sys) = default_system {
            if messages.first().is_some_and(|m| m.role != "system") {
                out.push_str(sys);
            }
        }
        for m in messages {
            out.push_str("<|im_start|>");
            out.push_str(m.role);
            out.push('\n');
            out.push_str(m.content);
            out.push_str("<|im_end|>\n");
        }
        if add_generation_prompt {
            out.push_str("<|im_start|>assistant\n");
        }
        out
    }
}

/// Canonicalizes Jinja source for pattern matching: whitespace outside string literals is
/// dropped, literals are single-quoted, and raw newlines/tabs inside literals become escapes.
fn normalize_jinja(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut quote: Option<char> = None;
    let mut chars = src.chars();
    while let Some(c) = chars.next() {
        match quote {
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                out.push('\'');
            }
            None if c.is_whitespace() => {}
            None => out.push(c),
            Some(q) if c == q => {
                quote = None;
                out.push('\'');
            }
            Some(_) => match c {
                '\\' => {
                    out.push('\\');
                    if let Some(n) = chars.next() {
                        out.push(n);
                    }
                }
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\'' => out.push_str("\\'"),
                c => out.push(c),
            },
        }
    }
    out
}

/// Undoes the escapes of a single-quoted Jinja string literal.
fn jinja_unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// A tokenizer with its special ids and optional chat template.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    add_bos: bool,
    chat_template: Option<String>,
}

impl Tokenizer {
    /// Builds the tokenizer embedded in a GGUF file.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, TokenizerError> {
        let model = file.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model.to_owned()));
        }
        let pre = match file.get_str("tokenizer.ggml.pre") {
            Err(GgufError::MissingKey(_)) => "default",
            r => r?,
        };
        let pre_tokenizer = pre_tokenizer_for(pre)?;
        let tokens = file.get_str_array("tokenizer.ggml.tokens")?;
        let types = match file.get_i32_array("tokenizer.ggml.token_type") {
            Err(GgufError::MissingKey(_)) => vec![1; tokens.len()],
            r => r?,
        };
        if types.len() != tokens.len() {
            return Err(TokenizerError::BadVocab(format!(
                "{} tokens but {} token types",
                tokens.len(),
                types.len()
            )));
        }
        let mut vocab = Vocab::default();
        for (id, t) in tokens.iter().enumerate() {
            if vocab.insert((*t).to_owned(), id as u32).is_some() {
                return Err(TokenizerError::BadVocab(format!("duplicate token {t:?}")));
            }
        }
        let merges = file
            .get_str_array("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| TokenizerError::BadVocab(format!("merge {m:?} has no space")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(lib_err)?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &ty)| ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED)
            .map(|(t, _)| AddedToken::from(*t, true))
            .collect();
        inner.add_special_tokens(&specials);
        let opt_id = |key: &str| match file.get_u32(key) {
            Err(GgufError::MissingKey(_)) => Ok(None),
            r => r.map(Some),
        };
        let add_bos = match file.get_bool("tokenizer.ggml.add_bos_token") {
            Err(GgufError::MissingKey(_)) => false,
            r => r?,
        };
        let chat_template = match file.get_str("tokenizer.chat_template") {
            Err(GgufError::MissingKey(_)) => None,
            r => Some(r?.to_owned()),
        };
        Ok(Self {
            inner,
            bos_id: opt_id("tokenizer.ggml.bos_token_id")?,
            eos_id: opt_id("tokenizer.ggml.eos_token_id")?,
            add_bos,
            chat_template,
        })
    }

    /// Loads a Hugging Face `tokenizer.json`. `bos_id`/`eos_id` usually come from `config.json`.
    pub fn from_file(
        path: impl AsRef<Path>,
        bos_id: Option<u32>,
        eos_id: Option<u32>,
    ) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io {
            path: path.to_owned(),
            source,
        })?;
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(lib_err)?;
        Ok(Self {
            inner,
            bos_id,
            eos_id,
            add_bos: false,
            chat_template: None,
        })
    }

    /// Loads `tokenizer.json` from a Hugging Face model directory, plus `add_bos_token` and
    /// `chat_template` from its `tokenizer_config.json` when present.
    pub fn from_hf_dir(
        dir: impl AsRef<Path>,
        bos_id: Option<u32>,
        eos_id: Option<u32>,
    ) -> Result<Self, TokenizerError> {
        let dir = dir.as_ref();
        let mut tok = Self::from_file(dir.join("tokenizer.json"), bos_id, eos_id)?;
        let cfg_path = dir.join("tokenizer_config.json");
        if let Ok(text) = std::fs::read_to_string(&cfg_path) {
            let cfg: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| TokenizerError::BadVocab(format!("{}: {e}", cfg_path.display())))?;
            tok.add_bos = cfg
                .get("add_bos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            tok.chat_template = match cfg.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                // Newer configs may hold a list of named templates; use the default one.
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(str::to_owned),
                _ => None,
            };
        }
        Ok(tok)
    }

    /// Encodes text into token ids; special tokens written in the text (e.g. `<|im_start|>`)
    /// map to their ids. `add_bos` prepends the BOS id when the model has one.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.inner.encode(text, false).map_err(lib_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if let (true, Some(bos)) = (add_bos, self.bos_id) {
            ids.push(bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Decodes ids back to text (special tokens are kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        let vocab = self.vocab_size();
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(TokenizerError::BadTokenId { id, vocab });
        }
        self.inner.decode(ids, false).map_err(lib_err)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Beginning-of-sequence id.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// End-of-sequence id.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Whether the model expects a BOS token at the start of a prompt
    /// (`tokenizer.ggml.add_bos_token` / `add_bos_token`).
    pub fn add_bos_default(&self) -> bool {
        self.add_bos
    }

    /// The raw Jinja chat template source, if the model has one.
    pub fn chat_template_source(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The recognised chat template.
    pub fn chat_template(&self) -> Result<ChatTemplate, TokenizerError> {
        ChatTemplate::detect(
            self.chat_template
                .as_deref()
                .ok_or(TokenizerError::NoChatTemplate)?,
        )
    }

    /// Renders a conversation with the model's chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage<'_>],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        Ok(self
            .chat_template()?
            .render(messages, add_generation_prompt))
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Serialises the whole tokenizer (vocabulary, merges, pre-tokenizer, special ids, chat
    /// template) to one JSON document, so a stack file can carry it; read back with
    /// [`Tokenizer::from_json`].
    pub fn to_json(&self) -> Result<Vec<u8>, TokenizerError> {
        let inner = self.inner.to_string(false).map_err(lib_err)?;
        let doc = TokenizerDoc {
            add_bos: self.add_bos,
            bos_id: self.bos_id,
            chat_template: self.chat_template.as_deref(),
            eos_id: self.eos_id,
            format: "bitstack-tokenizer-1",
            tokenizer: &inner,
        };
        serde_json::to_vec(&doc).map_err(lib_err)
    }

    /// Reads a tokenizer written by [`Tokenizer::to_json`].
    pub fn from_json(bytes: &[u8]) -> Result<Self, TokenizerError> {
        let bad = |what: &str| TokenizerError::BadVocab(format!("tokenizer document: {what}"));
        let doc: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| bad(&e.to_string()))?;
        if doc.get("format").and_then(|f| f.as_str()) != Some("bitstack-tokenizer-1") {
            return Err(bad("unknown format tag"));
        }
        let inner_json = doc
            .get("tokenizer")
            .and_then(|t| t.as_str())
            .ok_or_else(|| bad("missing tokenizer"))?;
        let inner = tokenizers::Tokenizer::from_bytes(inner_json.as_bytes()).map_err(lib_err)?;
        let id = |key: &str| -> Result<Option<u32>, TokenizerError> {
            match doc.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|v| u32::try_from(v).ok())
                    .map(Some)
                    .ok_or_else(|| bad(key)),
            }
        };
        Ok(Self {
            inner,
            bos_id: id("bos_id")?,
            eos_id: id("eos_id")?,
            add_bos: doc
                .get("add_bos")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            chat_template: doc
                .get("chat_template")
                .and_then(|v| v.as_str())
                .map(str::to_owned),
        })
    }
}

/// The pre-tokenizer matching a GGUF `tokenizer.ggml.pre` value.
fn pre_tokenizer_for(pre: &str) -> Result<PreTokenizerWrapper, TokenizerError> {
    let byte_level = |use_regex| ByteLevel::new(false, true, use_regex);
    let split = |pattern: &str| -> Result<PreTokenizerWrapper, TokenizerError> {
        Ok(Split::new(
            SplitPattern::Regex(pattern.to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(lib_err)?
        .into())
    };
    Ok(match pre {
        "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level(true).into()]).into(),
        "gpt2" | "default" => byte_level(true).into(),
        "llama-bpe" | "llama3" => {
            Sequence::new(vec![split(LLAMA3_PATTERN)?, byte_level(false).into()]).into()
        }
        "qwen2" => Sequence::new(vec![split(QWEN2_PATTERN)?, byte_level(false).into()]).into(),
        other => return Err(TokenizerError::UnsupportedPreTokenizer(other.to_owned())),
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Instant;

    #[test]
    fn tokenizer_doc_keeps_the_bytes_of_the_json_value_it_replaced() {
        // The document was a serde_json::Value (keys sorted); a file's bytes must not change.
        for (bos, template) in [(Some(1u32), Some("{{ \"x\" }}\n")), (None, None)] {
            let doc = super::TokenizerDoc {
                add_bos: bos.is_some(),
                bos_id: bos,
                chat_template: template,
                eos_id: Some(2),
                format: "bitstack-tokenizer-1",
                tokenizer: "{\"model\": {}}",
            };
            let old = serde_json::json!({
                "format": "bitstack-tokenizer-1",
                "tokenizer": "{\"model\": {}}",
                "bos_id": bos,
                "eos_id": Some(2),
                "add_bos": bos.is_some(),
                "chat_template": template,
            });
            assert_eq!(
                serde_json::to_vec(&doc).unwrap(),
                old.to_string().into_bytes()
            );
        }
    }

    use super::*;

    fn shared() -> PathBuf {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared"))
    }

    fn smollm_tokenizer() -> Option<Tokenizer> {
        let p = shared().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        if !p.exists() {
            println!("skipped: {} is absent", p.display());
            return None;
        }
        Some(Tokenizer::from_gguf(&GgufFile::open(p).unwrap()).unwrap())
    }

    fn shared_smollm() -> Option<&'static Tokenizer> {
        static TOK: std::sync::OnceLock<Option<Tokenizer>> = std::sync::OnceLock::new();
        TOK.get_or_init(smollm_tokenizer).as_ref()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Byte-level BPE is lossless on any text without special-token strings.
        #[test]
        fn decode_inverts_encode(text in "\\PC{0,40}") {
            if let Some(tok) = shared_smollm() {
                let ids = tok.encode(&text, false).unwrap();
                proptest::prop_assert_eq!(tok.decode(&ids).unwrap(), text);
            }
        }
    }

    #[test]
    fn wikitext2_test_token_count() {
        let Some(tok) = smollm_tokenizer() else {
            return;
        };
        let p = shared().join("data/wikitext2-test.raw");
        let Ok(text) = std::fs::read_to_string(&p) else {
            println!("skipped: {} is absent", p.display());
            return;
        };
        let t = Instant::now();
        let ids = tok.encode(&text, false).unwrap();
        println!("tokenized {} bytes in {:?}", text.len(), t.elapsed());
        assert_eq!(ids.len(), 301_948);
        // Byte-level BPE is lossless.
        assert_eq!(tok.decode(&ids).unwrap(), text);
    }

    #[test]
    fn smollm_basics() {
        let Some(tok) = smollm_tokenizer() else {
            return;
        };
        assert_eq!(tok.vocab_size(), 49152);
        assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
        assert!(!tok.add_bos_default());
        // Digits are split individually, as in the HF pre-tokenizer.
        let ids = tok.encode("2024", false).unwrap();
        assert_eq!(ids.len(), 4);
        assert_eq!(tok.decode(&ids).unwrap(), "2024");
        // Special tokens in text map to single ids; BOS is prepended on request.
        let ids = tok.encode("<|im_start|>user", true).unwrap();
        assert_eq!(&ids[..2], &[1, 1]);
        assert_eq!(tok.id_to_token(2).as_deref(), Some("<|im_end|>"));
        assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
        assert!(matches!(
            tok.decode(&[49152]),
            Err(TokenizerError::BadTokenId { id: 49152, .. })
        ));
    }

    #[test]
    fn smollm_chat_template() {
        let Some(tok) = smollm_tokenizer() else {
            return;
        };
        let user = [ChatMessage {
            role: "user",
            content: "What is 2+2?",
        }];
        assert_eq!(
            tok.apply_chat_template(&user, true).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by \
             Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        let with_system = [
            ChatMessage {
                role: "system",
                content: "Be brief.",
            },
            ChatMessage {
                role: "user",
                content: "Hi",
            },
        ];
        assert_eq!(
            tok.apply_chat_template(&with_system, false).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn hf_tokenizer_json_round_trip() {
        let Some(tok) = smollm_tokenizer() else {
            return;
        };
        let dir = std::env::temp_dir().join(format!("bitstack-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let json = serde_json::to_string(tok.inner()).unwrap();
        std::fs::write(dir.join("tokenizer.json"), json).unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            serde_json::json!({
                "add_bos_token": true,
                "chat_template": tok.chat_template_source().unwrap(),
            })
            .to_string(),
        )
        .unwrap();
        let hf = Tokenizer::from_hf_dir(&dir, Some(1), Some(2));
        std::fs::remove_dir_all(&dir).unwrap();
        let hf = hf.unwrap();
        let text = "Hello world! 12345 <|im_start|>assistant\n  tabs\tand ünïcödé";
        assert_eq!(
            hf.encode(text, false).unwrap(),
            tok.encode(text, false).unwrap()
        );
        assert!(hf.add_bos_default());
        assert_eq!(hf.chat_template().unwrap(), tok.chat_template().unwrap());
    }

    #[test]
    fn chat_template_detection() {
        let plain = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + \
                     message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if \
                     add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
        assert_eq!(
            ChatTemplate::detect(plain).unwrap(),
            ChatTemplate::ChatMl {
                default_system: None
            }
        );
        let llama3 = "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] \
                      + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}\
                      {% endfor %}";
        assert!(matches!(
            ChatTemplate::detect(llama3),
            Err(TokenizerError::UnsupportedChatTemplate)
        ));
        assert_eq!(jinja_unescape(r"a\nb\\c\'"), "a\nb\\c'");
    }

    #[test]
    fn gguf_vocab_errors() {
        use crate::gguf::{GgufBuilder, GgufValue, GgufValueType};
        let strings = |v: &[&str]| GgufValue::Array {
            elem_type: GgufValueType::String,
            values: v.iter().map(|s| GgufValue::String((*s).into())).collect(),
        };
        let build = |model: &str, pre: &str, tokens: &[&str], merges: &[&str]| {
            let mut b = GgufBuilder::new();
            b.metadata("tokenizer.ggml.model", GgufValue::String(model.into()))
                .metadata("tokenizer.ggml.pre", GgufValue::String(pre.into()))
                .metadata("tokenizer.ggml.tokens", strings(tokens))
                .metadata("tokenizer.ggml.merges", strings(merges));
            Tokenizer::from_gguf(&GgufFile::from_bytes(b.build()).unwrap())
        };
        assert!(matches!(
            build("llama", "default", &["a"], &[]),
            Err(TokenizerError::UnsupportedModel(_))
        ));
        assert!(matches!(
            build("gpt2", "deepseek-coder", &["a"], &[]),
            Err(TokenizerError::UnsupportedPreTokenizer(_))
        ));
        assert!(matches!(
            build("gpt2", "gpt2", &["a", "a"], &[]),
            Err(TokenizerError::BadVocab(_))
        ));
        assert!(matches!(
            build("gpt2", "gpt2", &["a", "b", "ab"], &["ab"]),
            Err(TokenizerError::BadVocab(_))
        ));
        // A minimal working vocabulary: merges apply, unknown pre-tokens have no id.
        let tok = build("gpt2", "llama-bpe", &["a", "b", "ab", "Ġ"], &["a b"]).unwrap();
        assert_eq!(tok.encode("abab", false).unwrap(), vec![2, 2]);
        assert_eq!(tok.decode(&[2, 3, 0]).unwrap(), "ab a");
        assert!(matches!(
            tok.chat_template(),
            Err(TokenizerError::NoChatTemplate)
        ));
    }
}
