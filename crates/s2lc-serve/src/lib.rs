//! The S2LC server: an OpenAI-style HTTP API over one base model, with LoRA adapters pulled from
//! the Adapter Store and unpacked just in time into a byte-budgeted cache.
//!
//! - [`cache`]: the JIT cache (LRU, pinning, single-flight loads, budget).
//! - [`source`]: where adapters come from: the store (`name@semver-req`), pulled, checked against
//!   the base model's digest, and unpacked (a PEFT directory or one S2LC pack member).
//! - [`client`]: a minimal blocking HTTP client for tests and `s2lc bench serve`.
//! - [`router`]: semantic routing (prompt embedding vs each adapter's centroid).
//! - [`router`]'s tag rules pick an adapter from a request's tags.
//! - [`batch`]: continuous batching: concurrent requests decode together, one batched forward
//!   pass per step (base weights read once for all rows, each row with its own KV cache and
//!   adapter).
//! - [`api`]: the routes (`/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/health`,
//!   `/metrics`), JSON errors, API keys, admission (429 past the queue), deadlines and
//!   connection limits.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod api;
pub mod batch;
pub mod cache;
pub mod client;
pub mod resident;
pub mod router;
pub mod source;

pub use api::{serve, Engine, ServeConfig, ServeError, Server};
pub use batch::BatchConfig;
pub use cache::{CacheError, CacheStats, JitCache};
pub use router::{RouteTable, SemanticRouter};
pub use source::{AdapterSource, StoreSource};
