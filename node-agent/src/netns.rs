//! Network namespaces of the agent's own, with nothing but a loopback device: where the page
//! servers and lazy-pages daemons of post-copy migrations listen and connect (docs/node-agent.md#post-copy).
//! CRIU's page server binds every address of its namespace; in one of these, only the agent can
//! reach it. A namespace lives as long as the processes started in it (and sockets opened in it);
//! the agent finds it again through one of those processes (a pidfd), never through `/proc`,
//! which may belong to another PID namespace than the agent's.

use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::OwnedFd,
};

use nix::sched::{CloneFlags, setns, unshare};

/// A private network namespace (loopback only), held through a process that runs in it.
#[derive(Debug)]
pub struct PrivateNet {
    member: OwnedFd,
}

impl PrivateNet {
    /// Makes a namespace with its loopback up and runs `start` in it, on a thread of its own (the
    /// caller's thread is untouched): listeners `start` binds and processes it spawns are in the
    /// namespace. `start` answers what it made and the PID of a process that holds the namespace.
    pub fn start<T: Send>(
        start: impl FnOnce() -> std::io::Result<(T, u32)> + Send,
    ) -> std::io::Result<(T, Self)> {
        let runtime = tokio::runtime::Handle::try_current().ok();
        std::thread::scope(|s| {
            s.spawn(|| -> std::io::Result<(T, Self)> {
                // Processes spawned through tokio need its runtime.
                let _runtime = runtime.as_ref().map(tokio::runtime::Handle::enter);
                unshare(CloneFlags::CLONE_NEWNET)?;
                crate::address::loopback_up()?;
                let (made, pid) = start()?;
                let pid = rustix::process::Pid::from_raw(pid as i32)
                    .ok_or_else(|| std::io::Error::other("no process holds the namespace"))?;
                let member =
                    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())?;
                Ok((made, Self { member }))
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the namespace thread panicked")))
        })
    }

    /// Runs `f` on a thread inside the namespace (sockets it opens stay in it).
    fn run<T: Send>(&self, f: impl FnOnce() -> std::io::Result<T> + Send) -> std::io::Result<T> {
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(&self.member, CloneFlags::CLONE_NEWNET)?;
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the namespace thread panicked")))
        })
    }

    /// A connection to `port` on the namespace's loopback.
    pub fn connect(&self, port: u16) -> std::io::Result<tokio::net::TcpStream> {
        let stream =
            self.run(|| TcpStream::connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)))?;
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        tokio::net::TcpStream::from_std(stream)
    }
}

/// A listener on the loopback of the calling thread's namespace (inside [`PrivateNet::start`]).
pub fn listen(port: u16) -> std::io::Result<tokio::net::TcpListener> {
    let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))?;
    listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(listener)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    // Needs root (network namespaces), as the agent does.
    #[tokio::test]
    async fn a_private_namespace_is_reachable_only_through_its_handle() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let ((listener, mut child), net) = PrivateNet::start(|| {
            let listener = listen(27100)?;
            let child = tokio::process::Command::new("sleep")
                .arg("30")
                .kill_on_drop(true)
                .spawn()?;
            let pid = child.id().unwrap_or_default();
            Ok(((listener, child), pid))
        })
        .unwrap();
        // The process runs in the namespace, not in the agent's.
        let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
        let pid = child.id().unwrap().to_string();
        assert_ne!(ns(&pid), ns("self"));
        // The agent's own namespace has no listener on that port.
        assert!(TcpStream::connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 27100)).is_err());
        let mut client = net.connect(27100).unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        client.write_all(b"page").await.unwrap();
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"page");
        child.kill().await.unwrap();
    }
}
