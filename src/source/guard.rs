//! Step 3b of the request flow (url → cache → **source** → image → store → response) for the seed's
//! `?source=URL` override: the rules a client-named URL must pass before, and while, we fetch it
//! (docs/urls.md). Without them the override is a server-side request forgery primitive: "fetch
//! `http://169.254.169.254/` for me and tell me how it went".
//!
//! Off by default: the service answers 403 before this module is reached. When
//! `allow_source_override` is on, a source URL is refused (403, `rejected.source_refused`) unless:
//!
//! 1. it parses (after the client's percent-decoding of the query value), is at most
//!    [`MAX_SOURCE_URL_LEN`] bytes, is `http` or `https`, and carries no user name or password;
//! 2. its host is in `allowed_source_hosts`, exactly or below a dot boundary ([`AllowedHosts`]:
//!    `example.com` allows `img.example.com`, never `badexample.com`); an IP literal only matches an
//!    IP entry, exactly. Hosts are compared in the `url` crate's normal form: lower case, IDNs as
//!    punycode, and IPv4 spellings such as `2130706433`, `0x7f000001`, `0177.0.0.1` or `127.1`
//!    already turned into `127.0.0.1`, so a spelling cannot slip past the list;
//! 3. an IP-literal host is itself a public address ([`is_public`]); no DNS is involved there, so
//!    this is the connect-time check for it;
//! 4. for a name, every address the resolver returns is filtered through [`is_public`] *inside* the
//!    HTTP client's resolver ([`GuardedResolver`]) before the connector sees it: the addresses checked
//!    are the addresses dialled, so DNS rebinding (public when asked once, `127.0.0.1` when asked
//!    again) cannot work, and a name resolving only to internal addresses is never dialled at all;
//! 5. at most [`MAX_REDIRECTS`] redirects, each target re-checked by 1–3 before it is followed (and
//!    by 4 when its connection is made). `Referer` is not sent, so one host never learns another's URL.
//!
//! Every refusal, whether found before the fetch or during it (a redirect, a resolved address), is
//! [`Error::SourceRefused`] → 403: the URL broke a rule the operator set, which is the client's
//! doing. Ordinary failures of an allowed source (404, 5xx, slow, too big) map exactly as for the
//! configured origin. Ports are not restricted: the host allow-list and the address rule already
//! pin where a request can go.
//!
//! The pipeline keys the originals cache by the source URL and the result caches by a digest of it
//! ([`SourceUrl::digest`]), so an overridden request never shares an entry with the id's own
//! original.

use std::error::Error as StdError;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use sha2::{Digest, Sha256};
use url::{Host, Url};

use super::http::{fetch_with, map_reqwest};
use super::{error_chain, SourceError, SourceLimits};
use crate::config::Config;
use crate::error::Error;

/// The statuses that mean an override's original is missing: the plain ones. A third-party host's
/// 403 is as likely hotlink protection as a missing object, and stays a 502 that is not remembered.
const OVERRIDE_NOT_FOUND: [u16; 2] = [404, 410];

/// The most redirects one override may follow.
pub const MAX_REDIRECTS: usize = 3;

/// The longest `?source=` URL accepted, in bytes: as long as any real image URL, short enough that
/// it cannot be used to make us hold or log large strings.
pub const MAX_SOURCE_URL_LEN: usize = 2048;

/// Which rule a source URL broke. Logged (at debug level), never sent: the client only sees 403.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not a URL, too long, no host, or `?source=` given more than once.
    #[error("source URL malformed, too long or repeated")]
    Malformed,
    /// A scheme other than http or https (`file:`, `ftp:`, `gopher:`, …).
    #[error("source URL scheme is not http or https")]
    Scheme,
    /// A user name or password in the URL.
    #[error("source URL carries credentials")]
    Userinfo,
    /// The host is not in `allowed_source_hosts`.
    #[error("source host not in allowed_source_hosts")]
    HostNotAllowed,
    /// The address to connect to is loopback, private, link-local, … ([`is_public`]).
    #[error("source address is not public")]
    InternalAddress,
    /// More than [`MAX_REDIRECTS`] redirects.
    #[error("too many redirects")]
    TooManyRedirects,
}

impl From<Refusal> for Error {
    fn from(r: Refusal) -> Error {
        tracing::debug!(reason = %r, "source override refused");
        Error::SourceRefused
    }
}

/// A source URL that passed the rules that can be checked before connecting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceUrl {
    url: Url,
    digest: String,
}

impl SourceUrl {
    /// The URL to fetch (normalised by the `url` crate, fragment removed).
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The first 128 bits of SHA-256 of the URL, as 32 hex digits: names the override in result-cache
    /// keys without putting a client-chosen string into an object key.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The originals-cache key: the URL itself, so every id naming the same source shares one
    /// download, and no id's own original is ever replaced by it.
    pub fn originals_key(&self) -> String {
        format!("source:{}", self.url)
    }
}

/// `allowed_source_hosts`: names matched exactly or at a dot boundary, IP addresses exactly.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowedHosts {
    names: Vec<String>,
    ips: Vec<IpAddr>,
}

impl AllowedHosts {
    /// From the configured entries (already lower-cased and checked by `config`). Entries that are IP
    /// addresses (`203.0.113.7`, `2001:db8::1` or `[2001:db8::1]`) only ever match that address.
    pub fn new(entries: &[String]) -> AllowedHosts {
        let mut hosts = AllowedHosts::default();
        for e in entries {
            let e = e.trim().trim_end_matches('.').to_ascii_lowercase();
            let bare = e.trim_start_matches('[').trim_end_matches(']');
            match bare.parse::<IpAddr>() {
                Ok(ip) => hosts.ips.push(ip),
                Err(_) if !e.is_empty() => hosts.names.push(e),
                Err(_) => {}
            }
        }
        hosts
    }

    /// Whether a URL's host is allowed.
    pub fn allows(&self, host: &Host<&str>) -> bool {
        match host {
            Host::Domain(d) => {
                // One trailing dot is the same name in DNS ("example.com." is fully qualified).
                let d = d.strip_suffix('.').unwrap_or(d);
                self.names.iter().any(|n| {
                    d == n
                        || (d.len() > n.len()
                            && d.ends_with(n.as_str())
                            && d.as_bytes()[d.len() - n.len() - 1] == b'.')
                })
            }
            Host::Ipv4(a) => self.ips.contains(&IpAddr::V4(*a)),
            Host::Ipv6(a) => self.ips.contains(&IpAddr::V6(*a)),
        }
    }
}

/// Which addresses an override may connect to: the public ones ([`is_public`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    also_allowed: Vec<IpAddr>,
}

impl AddressPolicy {
    /// Public addresses only: the policy of every configured server.
    pub fn public_only() -> AddressPolicy {
        AddressPolicy::default()
    }

    /// Public addresses plus these exact ones. For the integration tests only, which must never send
    /// a packet off loopback and so play "public internet" on 127.0.0.1 (and "internal network" on
    /// 127.0.0.2+). No configuration key reaches this.
    #[doc(hidden)]
    pub fn for_tests(also_allowed: Vec<IpAddr>) -> AddressPolicy {
        AddressPolicy { also_allowed }
    }

    /// Whether a connection to `ip` is allowed.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.also_allowed.contains(&ip) || is_public(ip)
    }
}

/// Whether `ip` is an ordinary public unicast address, the only kind an override may reach.
///
/// Refused IPv4: `0.0.0.0/8` (this network, unspecified), `10/8`, `172.16/12`, `192.168/16`
/// (private), `100.64/10` (CGNAT), `127/8` (loopback), `169.254/16` (link-local, cloud metadata),
/// `192.0.0/24` (IETF assignments), `192.0.2/24`, `198.51.100/24`, `203.0.113/24` (documentation),
/// `192.88.99/24` (6to4 relays), `198.18/15` (benchmarking), `224/4` (multicast), `240/4` (reserved,
/// broadcast).
///
/// IPv6 forms that carry an IPv4 address are judged by it: v4-mapped `::ffff:a.b.c.d`,
/// v4-compatible `::a.b.c.d` (which also covers `::` and `::1`), NAT64 `64:ff9b::/96`. Otherwise only
/// global unicast `2000::/3` is allowed (so ULA `fc00::/7`, link-local `fe80::/10`, multicast
/// `ff00::/8`, local NAT64 `64:ff9b:1::/48`, discard `100::/64` are out), minus Teredo `2001::/32`
/// and 6to4 `2002::/16` (tunnels whose far end is an IPv4 address inside the IPv6 one: refused whole
/// rather than decoded), benchmarking `2001:2::/48`, ORCHID `2001:10::/28` and `2001:20::/28`, and
/// documentation `2001:db8::/32` and `3fff::/20`.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => is_public_v4(a),
        IpAddr::V6(a) => is_public_v6(a),
    }
}

/// IPv4 ranges an override never connects to, as (network, prefix length).
const BLOCKED_V4: [(u32, u32); 15] = [
    (0x0000_0000, 8),  // 0.0.0.0/8: "this network", includes 0.0.0.0
    (0x0a00_0000, 8),  // 10.0.0.0/8: private
    (0x6440_0000, 10), // 100.64.0.0/10: carrier-grade NAT
    (0x7f00_0000, 8),  // 127.0.0.0/8: loopback
    (0xa9fe_0000, 16), // 169.254.0.0/16: link-local (169.254.169.254 = cloud metadata)
    (0xac10_0000, 12), // 172.16.0.0/12: private
    (0xc000_0000, 24), // 192.0.0.0/24: IETF protocol assignments
    (0xc000_0200, 24), // 192.0.2.0/24: TEST-NET-1
    (0xc058_6300, 24), // 192.88.99.0/24: 6to4 relay anycast
    (0xc0a8_0000, 16), // 192.168.0.0/16: private
    (0xc612_0000, 15), // 198.18.0.0/15: benchmarking
    (0xc633_6400, 24), // 198.51.100.0/24: TEST-NET-2
    (0xcb00_7100, 24), // 203.0.113.0/24: TEST-NET-3
    (0xe000_0000, 4),  // 224.0.0.0/4: multicast
    (0xf000_0000, 4),  // 240.0.0.0/4: reserved, includes 255.255.255.255 broadcast
];

/// Ranges inside `2000::/3` that are not ordinary global unicast.
const BLOCKED_V6: [(u128, u32); 7] = [
    (0x2001_0000_u128 << 96, 32), // 2001::/32: Teredo
    (0x2001_0002_u128 << 96, 48), // 2001:2::/48: benchmarking
    (0x2001_0010_u128 << 96, 28), // 2001:10::/28: ORCHID
    (0x2001_0020_u128 << 96, 28), // 2001:20::/28: ORCHIDv2
    (0x2001_0db8_u128 << 96, 32), // 2001:db8::/32: documentation
    (0x2002_0000_u128 << 96, 16), // 2002::/16: 6to4
    (0x3fff_0000_u128 << 96, 20), // 3fff::/20: documentation
];

fn is_public_v4(a: Ipv4Addr) -> bool {
    let n = u32::from(a);
    !BLOCKED_V4
        .iter()
        .any(|&(net, bits)| (n ^ net) >> (32 - bits) == 0)
}

fn is_public_v6(a: Ipv6Addr) -> bool {
    if let Some(v4) = embedded_v4(a) {
        return is_public_v4(v4);
    }
    let n = u128::from(a);
    // Only 2000::/3 is allocated for global unicast.
    if n >> 125 != 0b001 {
        return false;
    }
    !BLOCKED_V6
        .iter()
        .any(|&(net, bits)| (n ^ net) >> (128 - bits) == 0)
}

/// The IPv4 address inside a v4-mapped (`::ffff:0:0/96`), v4-compatible (`::/96`) or NAT64
/// (`64:ff9b::/96`) IPv6 address: a connection to one of these reaches that IPv4 address.
fn embedded_v4(a: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = a.segments();
    // Truncation is the point: the low 32 bits are the IPv4 address.
    let low = Ipv4Addr::from((u128::from(a) & 0xffff_ffff) as u32);
    let mapped_or_compatible = s[..5] == [0; 5] && (s[5] == 0xffff || s[5] == 0);
    let nat64 = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    (mapped_or_compatible || nat64).then_some(low)
}

/// Checks one URL (the original, or a redirect's target) against rules 1–3 of the module doc.
fn check_url(url: &Url, hosts: &AllowedHosts, policy: &AddressPolicy) -> Result<(), Refusal> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Refusal::Scheme);
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Refusal::Userinfo);
    }
    let host = url.host().ok_or(Refusal::Malformed)?;
    if !hosts.allows(&host) {
        return Err(Refusal::HostNotAllowed);
    }
    // An IP literal is dialled as it is, without the resolver: its address is checked here.
    let literal = match host {
        Host::Ipv4(a) => Some(IpAddr::V4(a)),
        Host::Ipv6(a) => Some(IpAddr::V6(a)),
        Host::Domain(_) => None,
    };
    if literal.is_some_and(|ip| !policy.allows(ip)) {
        return Err(Refusal::InternalAddress);
    }
    Ok(())
}

/// Parses and checks a `?source=` value (rules 1–3).
pub fn check(
    raw: &str,
    hosts: &AllowedHosts,
    policy: &AddressPolicy,
) -> Result<SourceUrl, Refusal> {
    if raw.len() > MAX_SOURCE_URL_LEN {
        return Err(Refusal::Malformed);
    }
    let mut url = Url::parse(raw).map_err(|_| Refusal::Malformed)?;
    url.set_fragment(None);
    check_url(&url, hosts, policy)?;
    let digest = hex::encode(&Sha256::digest(url.as_str().as_bytes())[..16]);
    Ok(SourceUrl { url, digest })
}

/// The HTTP client's resolver: resolves with `inner`, then keeps only the addresses the policy
/// allows (rule 4). A name with nothing left is a [`Refusal::InternalAddress`], which travels up
/// through reqwest's error chain and becomes 403.
pub struct GuardedResolver {
    inner: Arc<dyn Resolve>,
    policy: Arc<AddressPolicy>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let lookup = self.inner.resolve(name);
        let policy = self.policy.clone();
        Box::pin(async move {
            let found: Vec<SocketAddr> = lookup.await?.collect();
            if found.is_empty() {
                return Err("name resolved to no address".into());
            }
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| policy.allows(a.ip()))
                .collect();
            if allowed.is_empty() {
                return Err(Box::new(Refusal::InternalAddress) as Box<dyn StdError + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// The operating system's resolver (`getaddrinfo` on a blocking thread, as reqwest's default).
struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// The override's rules and its own HTTP client (redirect policy and resolver enforce them).
#[derive(Clone)]
pub struct SourceGuard {
    hosts: Arc<AllowedHosts>,
    policy: Arc<AddressPolicy>,
    client: reqwest::Client,
    limits: SourceLimits,
}

impl std::fmt::Debug for SourceGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceGuard")
            .field("hosts", &self.hosts)
            .field("policy", &self.policy)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl SourceGuard {
    /// The guard named by the configuration: `None` when `allow_source_override` is off (then every
    /// `?source=` is refused). Uses the system resolver and [`AddressPolicy::public_only`].
    pub fn from_config(cfg: &Config) -> Result<Option<SourceGuard>, SourceError> {
        if !cfg.security.allow_source_override {
            return Ok(None);
        }
        SourceGuard::new(
            &cfg.security.allowed_source_hosts,
            SourceLimits::from_config(cfg),
            Arc::new(SystemResolver),
            AddressPolicy::public_only(),
        )
        .map(Some)
    }

    /// A guard with an explicit resolver and address policy (tests inject a loopback resolver).
    pub fn new(
        hosts: &[String],
        limits: SourceLimits,
        resolver: Arc<dyn Resolve>,
        policy: AddressPolicy,
    ) -> Result<SourceGuard, SourceError> {
        let hosts = Arc::new(AllowedHosts::new(hosts));
        let policy = Arc::new(policy);
        let redirect = {
            let hosts = hosts.clone();
            let policy = policy.clone();
            reqwest::redirect::Policy::custom(move |attempt| {
                // `previous` starts with the original URL: its length is the number of this hop.
                if attempt.previous().len() > MAX_REDIRECTS {
                    return attempt.error(Refusal::TooManyRedirects);
                }
                match check_url(attempt.url(), &hosts, &policy) {
                    Ok(()) => attempt.follow(),
                    Err(r) => attempt.error(r),
                }
            })
        };
        let client = reqwest::Client::builder()
            .connect_timeout(limits.connect_timeout)
            // HTTP_PROXY & co. would dial the proxy, not the checked address.
            .no_proxy()
            .redirect(redirect)
            .referer(false)
            .dns_resolver(Arc::new(GuardedResolver {
                inner: resolver,
                policy: policy.clone(),
            }))
            .user_agent(concat!("image-server/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| SourceError::Config(format!("HTTP client: {}", error_chain(&e))))?;
        Ok(SourceGuard {
            hosts,
            policy,
            client,
            limits,
        })
    }

    /// Checks a `?source=` value against the rules that need no connection (1–3).
    pub fn check(&self, raw: &str) -> Result<SourceUrl, Refusal> {
        check(raw, &self.hosts, &self.policy)
    }

    /// Fetches a checked source within the same limits as the configured origin (total deadline,
    /// byte limit while streaming), following at most [`MAX_REDIRECTS`] checked redirects and
    /// connecting only to allowed addresses.
    pub async fn fetch(&self, source: &SourceUrl) -> Result<Bytes, Error> {
        let exchange = fetch_with(
            &self.client,
            source.url.clone(),
            &self.limits,
            &OVERRIDE_NOT_FOUND,
            map_guarded,
        );
        match tokio::time::timeout(self.limits.fetch_timeout, exchange).await {
            Ok(result) => result,
            Err(_elapsed) => Err(SourceError::Timeout.into()),
        }
    }
}

/// A transport error of the override: a [`Refusal`] anywhere in its chain (from the redirect policy
/// or the resolver) is 403; anything else is sorted as for the configured origin.
fn map_guarded(err: reqwest::Error) -> Error {
    match refusal_in(&err) {
        Some(r) => r.into(),
        None => Error::Source(map_reqwest(err)),
    }
}

fn refusal_in(err: &(dyn StdError + 'static)) -> Option<Refusal> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<Refusal>() {
            return Some(*r);
        }
        cur = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn address_classifier_table() {
        let table: &[(&str, bool)] = &[
            // Public.
            ("8.8.8.8", true),
            ("1.1.1.1", true),
            ("93.184.215.14", true),
            ("100.63.255.255", true),
            ("100.128.0.0", true),
            ("172.15.255.255", true),
            ("172.32.0.0", true),
            ("192.0.1.1", true),
            ("198.17.255.255", true),
            ("198.20.0.0", true),
            ("223.255.255.255", true),
            ("2606:4700:4700::1111", true),
            ("2a00:1450:4001:80b::200e", true),
            ("::ffff:8.8.8.8", true),
            ("64:ff9b::808:808", true),
            // IPv4 refused.
            ("0.0.0.0", false),
            ("0.1.2.3", false),
            ("10.0.0.1", false),
            ("100.64.0.1", false),
            ("100.127.255.254", false),
            ("127.0.0.1", false),
            ("127.255.255.254", false),
            ("169.254.169.254", false),
            ("172.16.0.1", false),
            ("172.31.255.255", false),
            ("192.0.0.170", false),
            ("192.0.2.1", false),
            ("192.88.99.1", false),
            ("192.168.1.1", false),
            ("198.18.0.1", false),
            ("198.19.255.255", false),
            ("198.51.100.7", false),
            ("203.0.113.9", false),
            ("224.0.0.1", false),
            ("239.255.255.250", false),
            ("240.0.0.1", false),
            ("255.255.255.255", false),
            // IPv6 refused, plain.
            ("::", false),
            ("::1", false),
            ("fc00::1", false),
            ("fd12:3456::1", false),
            ("fe80::1", false),
            ("febf::1", false),
            ("fec0::1", false),
            ("ff02::1", false),
            ("100::1", false),
            ("64:ff9b:1::1", false),
            ("2001::1", false),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", false),
            ("2001:2::1", false),
            ("2001:10::1", false),
            ("2001:20::1", false),
            ("2001:db8::1", false),
            ("3fff::1", false),
            ("4000::1", false),
            // IPv6 forms embedding an internal IPv4 address.
            ("::ffff:127.0.0.1", false),
            ("::ffff:10.0.0.1", false),
            ("::ffff:169.254.169.254", false),
            ("::127.0.0.1", false),
            ("::a9fe:a9fe", false),
            ("64:ff9b::127.0.0.1", false),
            ("64:ff9b::a9fe:a9fe", false),
            ("64:ff9b::a00:1", false),
            ("2002:7f00:1::", false),
            ("2002:a9fe:a9fe::1", false),
            ("2002:808:808::1", false),
        ];
        for (addr, public) in table {
            assert_eq!(is_public(ip(addr)), *public, "{addr}");
        }
    }

    #[test]
    fn test_policy_only_adds_exact_addresses() {
        let p = AddressPolicy::for_tests(vec![ip("127.0.0.1")]);
        assert!(p.allows(ip("127.0.0.1")));
        assert!(!p.allows(ip("127.0.0.2")));
        assert!(!p.allows(ip("::ffff:127.0.0.2")));
        assert!(p.allows(ip("8.8.8.8")));
        assert!(!AddressPolicy::public_only().allows(ip("127.0.0.1")));
    }

    fn hosts(list: &[&str]) -> AllowedHosts {
        AllowedHosts::new(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn host_allow_list_matches_at_dot_boundaries() {
        let h = hosts(&[
            "example.com",
            "cdn.other.org",
            "203.0.113.7",
            "[2001:db8::1]",
        ]);
        let allowed = |u: &str| {
            let url = Url::parse(u).expect("url");
            h.allows(&url.host().expect("host"))
        };
        assert!(allowed("http://example.com/a.jpg"));
        assert!(allowed("http://EXAMPLE.com./a.jpg"));
        assert!(allowed("http://img.example.com/a.jpg"));
        assert!(allowed("http://a.b.example.com/a.jpg"));
        assert!(allowed("http://cdn.other.org/a.jpg"));
        assert!(allowed("http://203.0.113.7/a.jpg"));
        assert!(allowed("http://[2001:db8::1]/a.jpg"));
        assert!(!allowed("http://badexample.com/a.jpg"));
        assert!(!allowed("http://example.com.evil.net/a.jpg"));
        assert!(!allowed("http://other.org/a.jpg"));
        assert!(!allowed("http://xcdn.other.org/a.jpg"));
        assert!(!allowed("http://203.0.113.8/a.jpg"));
        assert!(!allowed("http://localhost/a.jpg"));
    }

    #[test]
    fn url_rules() {
        let h = hosts(&["example.com", "127.0.0.1", "10.1.2.3", "::1"]);
        let p = AddressPolicy::public_only();
        let refused = |u: &str| check(u, &h, &p).err();
        assert_eq!(refused("http://img.example.com/a.jpg?x=1#frag"), None);
        assert_eq!(refused("https://example.com:8443/a.jpg"), None);
        assert_eq!(refused("ftp://example.com/a.jpg"), Some(Refusal::Scheme));
        assert_eq!(refused("file:///etc/passwd"), Some(Refusal::Scheme));
        assert_eq!(refused("gopher://example.com/"), Some(Refusal::Scheme));
        assert_eq!(
            refused("http://u:p@example.com/a.jpg"),
            Some(Refusal::Userinfo)
        );
        assert_eq!(
            refused("http://u@example.com/a.jpg"),
            Some(Refusal::Userinfo)
        );
        assert_eq!(refused("not a url"), Some(Refusal::Malformed));
        assert_eq!(refused("/relative.jpg"), Some(Refusal::Malformed));
        assert_eq!(
            refused("http://evil.com/a.jpg"),
            Some(Refusal::HostNotAllowed)
        );
        // An allowed IP literal must still be public: the literal is what gets dialled.
        assert_eq!(
            refused("http://127.0.0.1/a.jpg"),
            Some(Refusal::InternalAddress)
        );
        assert_eq!(
            refused("http://10.1.2.3/a.jpg"),
            Some(Refusal::InternalAddress)
        );
        assert_eq!(
            refused("http://[::1]/a.jpg"),
            Some(Refusal::InternalAddress)
        );
        let long = format!("http://example.com/{}", "a".repeat(MAX_SOURCE_URL_LEN));
        assert_eq!(refused(&long), Some(Refusal::Malformed));
        // The fragment is dropped; the digest names the URL.
        let a = check("http://example.com/a.jpg#x", &h, &p).expect("ok");
        let b = check("http://example.com/a.jpg", &h, &p).expect("ok");
        let c = check("http://example.com/b.jpg", &h, &p).expect("ok");
        assert_eq!(a, b);
        assert_eq!(a.digest().len(), 32);
        assert_ne!(a.digest(), c.digest());
        assert_eq!(a.originals_key(), "source:http://example.com/a.jpg");
    }

    #[test]
    fn numeric_ipv4_spellings_are_normalised_before_the_checks() {
        // The url crate (WHATWG rules) turns every spelling of 127.0.0.1 into the dotted form, so the
        // allow-list and the address rule both see the real address.
        for spelled in [
            "http://2130706433/",
            "http://0x7f000001/",
            "http://0177.0.0.1/",
            "http://127.1/",
            "http://0x7f.1/",
            "http://127.0.0.1./",
        ] {
            let url = Url::parse(spelled).expect("parses");
            assert_eq!(
                url.host(),
                Some(Host::Ipv4(Ipv4Addr::LOCALHOST)),
                "{spelled}"
            );
            let only_name = hosts(&["example.com"]);
            assert_eq!(
                check(spelled, &only_name, &AddressPolicy::public_only()).err(),
                Some(Refusal::HostNotAllowed),
                "{spelled}"
            );
            let with_ip = hosts(&["127.0.0.1"]);
            assert_eq!(
                check(spelled, &with_ip, &AddressPolicy::public_only()).err(),
                Some(Refusal::InternalAddress),
                "{spelled}"
            );
        }
        let url = Url::parse("http://[::ffff:127.0.0.1]/").expect("parses");
        assert_eq!(
            url.host(),
            Some(Host::Ipv6("::ffff:7f00:1".parse().expect("v6")))
        );
        let h = hosts(&["::ffff:127.0.0.1"]);
        assert_eq!(
            check(url.as_str(), &h, &AddressPolicy::public_only()).err(),
            Some(Refusal::InternalAddress)
        );
    }

    /// A resolver answering from a table, for the resolver filter.
    struct Table(Vec<SocketAddr>);

    impl Resolve for Table {
        fn resolve(&self, _name: Name) -> Resolving {
            let addrs = self.0.clone();
            Box::pin(async move { Ok(Box::new(addrs.into_iter()) as Addrs) })
        }
    }

    async fn resolve(found: &[&str]) -> Result<Vec<SocketAddr>, Option<Refusal>> {
        let r = GuardedResolver {
            inner: Arc::new(Table(
                found.iter().map(|s| SocketAddr::new(ip(s), 80)).collect(),
            )),
            policy: Arc::new(AddressPolicy::public_only()),
        };
        let name: Name = "img.example.com".parse().expect("name");
        match r.resolve(name).await {
            Ok(a) => Ok(a.collect()),
            Err(e) => Err(refusal_in(e.as_ref())),
        }
    }

    #[tokio::test]
    async fn resolver_drops_internal_addresses() {
        assert_eq!(
            resolve(&["127.0.0.1"]).await,
            Err(Some(Refusal::InternalAddress))
        );
        assert_eq!(
            resolve(&["10.0.0.1", "::ffff:169.254.169.254"]).await,
            Err(Some(Refusal::InternalAddress))
        );
        assert_eq!(
            resolve(&["10.0.0.1", "8.8.8.8"]).await,
            Ok(vec![SocketAddr::new(ip("8.8.8.8"), 80)])
        );
        // Nothing found at all is an ordinary failure (502), not a refusal.
        assert_eq!(resolve(&[]).await, Err(None));
    }
}
