# C declarations the data plane needs, and nothing else (uvloop's includes/ layout).
# Each block names the header it mirrors; see the man page cited for semantics.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "<sys/epoll.h>" nogil:
    # epoll_wait(2)
    cdef union epoll_data_t "epoll_data":
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64

    cdef struct epoll_event:
        uint32_t events
        epoll_data_t data

    enum:
        EPOLLIN
        EPOLLERR
        EPOLLHUP
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)


cdef extern from "<sys/uio.h>" nogil:
    cdef struct iovec:
        void *iov_base
        size_t iov_len


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t

    cdef struct sockaddr:
        sa_family_t sa_family

    cdef struct sockaddr_storage:
        sa_family_t ss_family

    cdef struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags

    # recvmmsg(2), sendmmsg(2)
    cdef struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len

    cdef struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type

    enum:
        AF_INET
        AF_INET6
        MSG_DONTWAIT
        MSG_TRUNC
        MSG_CTRUNC
        SOL_SOCKET
        # socket(7): SO_SNDBUF/SO_RCVBUF above net.core.*mem_max (CAP_NET_ADMIN).
        SO_SNDBUFFORCE
        SO_RCVBUFFORCE

    cmsghdr *CMSG_FIRSTHDR(msghdr *msgh)
    cmsghdr *CMSG_NXTHDR(msghdr *msgh, cmsghdr *cmsg)
    unsigned char *CMSG_DATA(cmsghdr *cmsg)
    size_t CMSG_SPACE(size_t length)
    size_t CMSG_LEN(size_t length)

    int recvmmsg(int sockfd, mmsghdr *msgvec, unsigned int vlen, int flags, void *timeout)
    int sendmmsg(int sockfd, mmsghdr *msgvec, unsigned int vlen, int flags)
    ssize_t sendmsg(int sockfd, const msghdr *msg, int flags)


cdef extern from "<netinet/in.h>" nogil:
    cdef struct in_addr:
        uint32_t s_addr

    cdef struct in6_addr:
        uint8_t s6_addr[16]

    cdef struct sockaddr_in:
        sa_family_t sin_family
        uint16_t sin_port
        in_addr sin_addr

    cdef struct sockaddr_in6:
        sa_family_t sin6_family
        uint16_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id

    # ip(7) IP_PKTINFO and ipv6(7) IPV6_PKTINFO: the address a datagram was sent to,
    # and (on send) the source address to use.
    cdef struct in_pktinfo:
        int ipi_ifindex
        in_addr ipi_spec_dst
        in_addr ipi_addr

    cdef struct in6_pktinfo:
        in6_addr ipi6_addr
        unsigned int ipi6_ifindex

    enum:
        IPPROTO_IP
        IPPROTO_IPV6
        IPPROTO_TCP
        IPPROTO_UDP
        IP_PKTINFO
        IPV6_PKTINFO


cdef extern from "<netinet/udp.h>" nogil:
    enum:
        SOL_UDP
        # udp(7): send a train of equal-size datagrams as one buffer (UDP GSO);
        # receive such trains whole, with their segment size (UDP GRO).
        UDP_SEGMENT
        UDP_GRO


cdef extern from "<endian.h>" nogil:
    uint32_t htobe32(uint32_t)
    uint32_t be32toh(uint32_t)
    uint64_t htobe64(uint64_t)
    uint64_t be64toh(uint64_t)


cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    cdef struct timespec:
        time_t tv_sec
        long tv_nsec
    enum:
        CLOCK_MONOTONIC
    int clock_gettime(int clk_id, timespec *tp)


cdef extern from "<sys/timerfd.h>" nogil:
    # timerfd_create(2): the pacer's wake-up, at an absolute CLOCK_MONOTONIC
    # time with the resolution of a high-resolution timer.
    cdef struct itimerspec:
        timespec it_interval
        timespec it_value
    enum:
        TFD_NONBLOCK
        TFD_CLOEXEC
        TFD_TIMER_ABSTIME
    int timerfd_create(int clockid, int flags)
    int timerfd_settime(int fd, int flags, const itimerspec *new_value, itimerspec *old_value)


cdef extern from "<errno.h>" nogil:
    # errno(3), Linux: "Required key not available"; what send_probe() returns
    # before the first handshake.
    enum:
        ENOKEY
