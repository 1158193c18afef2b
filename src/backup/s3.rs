//! The S3 target (feature `s3`): any S3-compatible store through the `object_store` crate.
//! The async client runs on a small tokio runtime owned by the target, so the library's API
//! stays synchronous and no runtime leaks into embedders that do not enable the feature.

use super::target::{ObjectMeta, Target};
use crate::error::{Error, Result};
use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path as ObjPath;
use object_store::{
    GetOptions, GetRange, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig,
};
use std::ops::Range;
use std::time::{Duration, SystemTime};

/// Where an S3 repository is and how to reach it. Credentials come from the standard
/// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN` variables; `AWS_REGION`
/// and `AWS_ENDPOINT_URL` are read when the fields below are not set.
#[derive(Clone, Debug, Default)]
pub struct S3Options {
    /// The bucket, which must exist.
    pub bucket: String,
    /// Key prefix inside the bucket ("" for the bucket's root).
    pub prefix: String,
    /// Endpoint URL for a store other than AWS (MinIO, Ceph RGW, moto…).
    pub endpoint: Option<String>,
    /// The region (`AWS_REGION` when not set; stores other than AWS mostly ignore it).
    pub region: Option<String>,
    /// Path-style requests (`endpoint/bucket/key`), which most self-hosted stores need.
    pub path_style: bool,
    /// Allow plain `http://` endpoints (local servers only: nothing is encrypted).
    pub allow_http: bool,
    /// Retries per request, with exponential backoff (0: the default, 10).
    pub max_retries: usize,
    /// Credentials, when not from the environment.
    pub access_key_id: Option<String>,
    /// The secret for `access_key_id`.
    pub secret_access_key: Option<String>,
}

/// A repository in an S3 bucket.
pub struct S3Target {
    store: AmazonS3,
    prefix: String,
    rt: tokio::runtime::Runtime,
    desc: String,
}

fn s3_err(op: &'static str, key: &str, e: object_store::Error) -> Error {
    Error::Target {
        op,
        key: key.to_string(),
        source: std::io::Error::other(e.to_string()),
    }
}

impl S3Target {
    /// Connects (lazily: the first request is the first contact). `max_retries` 0 means the
    /// default of 10 retries within two minutes.
    pub fn new(opts: &S3Options) -> Result<S3Target> {
        if opts.bucket.is_empty() {
            return Err(Error::InvalidArgument("an S3 target needs a bucket".into()));
        }
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&opts.bucket)
            .with_virtual_hosted_style_request(!opts.path_style)
            .with_allow_http(opts.allow_http)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .with_retry(RetryConfig {
                max_retries: if opts.max_retries == 0 {
                    10
                } else {
                    opts.max_retries
                },
                retry_timeout: Duration::from_secs(120),
                ..RetryConfig::default()
            });
        if let Some(e) = &opts.endpoint {
            b = b.with_endpoint(e);
        }
        if let Some(r) = &opts.region {
            b = b.with_region(r);
        }
        if let (Some(k), Some(s)) = (&opts.access_key_id, &opts.secret_access_key) {
            b = b.with_access_key_id(k).with_secret_access_key(s);
        }
        let store = b
            .build()
            .map_err(|e| Error::InvalidArgument(format!("S3 target: {e}")))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("snapvol-s3")
            .enable_all()
            .build()
            .map_err(|e| Error::Target {
                op: "start",
                key: opts.bucket.clone(),
                source: e,
            })?;
        let prefix = opts.prefix.trim_matches('/').to_string();
        let desc = if prefix.is_empty() {
            format!("s3://{}", opts.bucket)
        } else {
            format!("s3://{}/{prefix}", opts.bucket)
        };
        Ok(S3Target {
            store,
            prefix,
            rt,
            desc,
        })
    }

    fn path(&self, key: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(key)
        } else {
            ObjPath::from(format!("{}/{key}", self.prefix))
        }
    }

    /// The repository key of a listed object path.
    fn key_of(&self, p: &ObjPath) -> String {
        let s = p.as_ref();
        if self.prefix.is_empty() {
            s.to_string()
        } else {
            s.strip_prefix(&format!("{}/", self.prefix))
                .unwrap_or(s)
                .to_string()
        }
    }
}

impl Target for S3Target {
    fn put(&self, key: &str, data: &[u8], create_only: bool) -> Result<bool> {
        let opts = PutOptions {
            mode: if create_only {
                PutMode::Create
            } else {
                PutMode::Overwrite
            },
            ..PutOptions::default()
        };
        let payload = PutPayload::from(bytes::Bytes::copy_from_slice(data));
        match self
            .rt
            .block_on(self.store.put_opts(&self.path(key), payload, opts))
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) if create_only => Ok(false),
            Err(e) => Err(s3_err("put", key, e)),
        }
    }

    fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Option<Vec<u8>>> {
        if range.as_ref().is_some_and(|r| r.start >= r.end) {
            return Ok(self.head(key)?.map(|_| Vec::new()));
        }
        let opts = GetOptions {
            range: range.map(GetRange::Bounded),
            ..GetOptions::default()
        };
        let path = self.path(key);
        let r = self.rt.block_on(async {
            let got = self.store.get_opts(&path, opts).await?;
            got.bytes().await
        });
        match r {
            Ok(b) => Ok(Some(b.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(s3_err("get", key, e)),
        }
    }

    fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        match self.rt.block_on(self.store.head(&self.path(key))) {
            Ok(m) => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: m.size,
                modified: SystemTime::from(m.last_modified),
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(s3_err("head", key, e)),
        }
    }

    fn list(&self, prefix: &str, each: &mut dyn FnMut(ObjectMeta) -> Result<()>) -> Result<()> {
        // object_store lists by whole path segments: list the folder, filter by the prefix.
        let folder = prefix.rsplit_once('/').map_or("", |(d, _)| d);
        let base = if folder.is_empty() {
            if self.prefix.is_empty() {
                None
            } else {
                Some(ObjPath::from(self.prefix.as_str()))
            }
        } else {
            Some(self.path(folder))
        };
        self.rt.block_on(async {
            let mut stream = self.store.list(base.as_ref());
            while let Some(item) = stream.next().await {
                let m = item.map_err(|e| s3_err("list", prefix, e))?;
                let key = self.key_of(&m.location);
                if key.starts_with(prefix) {
                    each(ObjectMeta {
                        key,
                        size: m.size,
                        modified: SystemTime::from(m.last_modified),
                    })?;
                }
            }
            Ok(())
        })
    }

    fn delete(&self, key: &str) -> Result<()> {
        match self.rt.block_on(self.store.delete(&self.path(key))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(s3_err("delete", key, e)),
        }
    }

    fn describe(&self) -> String {
        self.desc.clone()
    }
}
