//! veth links between namespaces, and a bridged LAN for topologies of three or more.

use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use super::netns::{Netns, NsInner};
use super::{context, parse_cidr, unique_name};

/// A veth pair: end `a` in one namespace, end `b` in another, both up, each with an
/// optional address. Dropping it deletes the pair (if its namespaces still exist).
#[derive(Debug)]
pub struct Link {
    a: Arc<NsInner>,
    b: Arc<NsInner>,
    a_if: String,
    b_if: String,
    a_ip: Option<IpAddr>,
    b_ip: Option<IpAddr>,
}

impl Link {
    /// Creates the pair. Addresses are CIDR strings such as `"198.18.0.1/24"`; an empty
    /// string leaves that end without an address. IPv6 addresses are added with
    /// `nodad`, so they are usable at once. `mtu` applies to both ends.
    pub fn new(
        a: &Netns,
        a_addr: &str,
        b: &Netns,
        b_addr: &str,
        mtu: Option<u32>,
    ) -> io::Result<Link> {
        let a_ip = optional_ip(a_addr)?;
        let b_ip = optional_ip(b_addr)?;
        let a_if = unique_name("va");
        let b_if = unique_name("vb");
        // Created inside `a`, peer moved straight into `b`: the names never exist in the
        // root namespace.
        let mut args: Vec<String> = vec!["link".into(), "add".into(), a_if.clone()];
        if let Some(mtu) = mtu {
            args.extend(["mtu".into(), mtu.to_string()]);
        }
        args.extend([
            "type".into(),
            "veth".into(),
            "peer".into(),
            "name".into(),
            b_if.clone(),
            "netns".into(),
            b.name().into(),
        ]);
        if let Some(mtu) = mtu {
            args.extend(["mtu".into(), mtu.to_string()]);
        }
        a.ip(&args)?;
        let link = Link {
            a: Arc::clone(a.inner()),
            b: Arc::clone(b.inner()),
            a_if,
            b_if,
            a_ip,
            b_ip,
        };
        configure_end(&link.a, &link.a_if, a_addr)?;
        configure_end(&link.b, &link.b_if, b_addr)?;
        Ok(link)
    }

    /// Interface name of end `a` (in the first namespace).
    pub fn a_if(&self) -> &str {
        &self.a_if
    }

    /// Interface name of end `b` (in the second namespace).
    pub fn b_if(&self) -> &str {
        &self.b_if
    }

    /// Address of end `a`, if it got one.
    pub fn a_ip(&self) -> Option<IpAddr> {
        self.a_ip
    }

    /// Address of end `b`, if it got one.
    pub fn b_ip(&self) -> Option<IpAddr> {
        self.b_ip
    }

    /// Sets both ends up or down: a cable pulled and plugged back.
    pub fn set_up(&self, up: bool) -> io::Result<()> {
        let state = if up { "up" } else { "down" };
        self.a.ip(["link", "set", &self.a_if, state])?;
        self.b.ip(["link", "set", &self.b_if, state])?;
        Ok(())
    }

    /// Sets the MTU of both ends.
    pub fn set_mtu(&self, mtu: u32) -> io::Result<()> {
        let mtu = mtu.to_string();
        self.a.ip(["link", "set", &self.a_if, "mtu", &mtu])?;
        self.b.ip(["link", "set", &self.b_if, "mtu", &mtu])?;
        Ok(())
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Deleting one end deletes the pair. Errors mean it is gone already.
        let _ = self.a.ip(["link", "del", &self.a_if]);
    }
}

fn optional_ip(addr: &str) -> io::Result<Option<IpAddr>> {
    if addr.is_empty() {
        Ok(None)
    } else {
        parse_cidr(addr).map(|(ip, _)| Some(ip))
    }
}

/// `ip addr add` (unless `addr` is empty) and `ip link set up` for one interface.
pub(crate) fn configure_end(ns: &NsInner, iface: &str, addr: &str) -> io::Result<()> {
    if !addr.is_empty() {
        let (ip, _) = parse_cidr(addr)?;
        let mut args = vec!["addr", "add", addr, "dev", iface];
        if ip.is_ipv6() {
            args.push("nodad");
        }
        ns.ip(&args)?;
    }
    ns.ip(["link", "set", iface, "up"])?;
    Ok(())
}

/// A switch: a namespace holding a bridge that other namespaces attach to with veth
/// pairs, for topologies where more than two nodes share one segment.
#[derive(Debug)]
pub struct Lan {
    // Ports first: dropped before the switch namespace.
    ports: Mutex<Vec<Link>>,
    switch: Netns,
    bridge: String,
}

impl Lan {
    /// Creates the switch namespace (`<prefix>-<pid>-<n>`) and its bridge, up, with
    /// forwarding delay 0 so ports forward at once.
    pub fn new(prefix: &str) -> io::Result<Lan> {
        let switch = Netns::new(prefix)?;
        let bridge = "br0".to_owned();
        switch.ip([
            "link",
            "add",
            &bridge,
            "type",
            "bridge",
            "forward_delay",
            "0",
            "stp_state",
            "0",
        ])?;
        switch.ip(["link", "set", &bridge, "up"])?;
        Ok(Lan {
            ports: Mutex::new(Vec::new()),
            switch,
            bridge,
        })
    }

    /// The switch namespace (e.g. to run a capture in it).
    pub fn switch(&self) -> &Netns {
        &self.switch
    }

    /// The bridge's name inside the switch namespace.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// Plugs `ns` into the switch with an interface carrying `addr` (CIDR, or empty for
    /// none); returns that interface's name in `ns`.
    pub fn attach(&self, ns: &Netns, addr: &str) -> io::Result<String> {
        self.attach_with_mtu(ns, addr, None)
    }

    /// [`attach`](Self::attach) with an MTU for both ends of the port.
    pub fn attach_with_mtu(&self, ns: &Netns, addr: &str, mtu: Option<u32>) -> io::Result<String> {
        let link = Link::new(ns, addr, &self.switch, "", mtu)?;
        self.switch
            .ip(["link", "set", link.b_if(), "master", &self.bridge])
            .map_err(|e| context(e, format_args!("attach {} to the LAN", ns.name())))?;
        let name = link.a_if().to_owned();
        self.ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(link);
        Ok(name)
    }
}
