/*
 * streamboot-nbd: attach a streamboot session's NBD export through the kernel's netlink
 * interface and keep it attached when its stream node dies (docs/failover.md).
 *
 *   streamboot-nbd [-d /dev/nbdN] [-t IO_TIMEOUT_S] [-w WAIT_S] [-r] [-f]
 *                  [-s http://BOOT-SERVER[:PORT]] [-L] -N EXPORT HOST:PORT [HOST:PORT...]
 *
 * It connects to the first node that answers, does the NBD handshake (fixed newstyle,
 * NBD_OPT_GO) and hands the socket to the kernel with NBD_CMD_CONNECT, asking it to hold
 * requests while no connection is alive (NBD_ATTR_DEAD_CONN_TIMEOUT, WAIT_S) instead of
 * failing them. Then it forks a watcher that stays in memory (mlockall: the root may be the
 * very device it repairs) and listens for NBD_CMD_LINK_DEAD: on it, it connects to the next
 * node of the list that answers (the dead one last), repeats the handshake for the same
 * export and gives the kernel the new socket with NBD_CMD_RECONFIGURE. The held requests
 * then go to the new node: the guest sees a stall, no I/O error. While no node answers it
 * says so on the console and keeps trying; nothing is dropped.
 *
 * The list is what the hand-off knew. With -s, a round in which no node of it answers
 * makes the helper ask the boot service for the live nodes now (GET /failover-nodes, the
 * export name as the bearer token) and put them first in its list: a node added since the
 * boot is found. An unanswered or malformed answer leaves the list as it was: the boot
 * service is never needed for a running client. -L only asks, prints the merged list and
 * exits (for the operator, and the tests).
 *
 * argv[0] starts with '@' in the watcher, so systemd leaves it alone at shutdown as it does
 * nbd-client -systemd-mark.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/genetlink.h>
#include <linux/nbd-netlink.h>
#include <linux/netlink.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define NBD_MAGIC 0x4e42444d41474943ULL   /* "NBDMAGIC" */
#define OPTS_MAGIC 0x49484156454f5054ULL  /* "IHAVEOPT" */
#define REPLY_MAGIC 0x3e889045565a9ULL
#define FLAG_FIXED_NEWSTYLE 1
#define FLAG_NO_ZEROES 2
#define OPT_GO 7
#define REP_ACK 1
#define REP_INFO 3
#define INFO_EXPORT 0
#define MAX_NODES 16
#define MAX_ANSWER 4096 /* the boot service's answer: a few dozen "host:port" */
#define REFRESH_MAX_WAIT_S 30

struct node {
	char host[256]; /* as getaddrinfo takes it: an IPv6 address without its brackets */
	char port[8];
	char shown[272]; /* "host:port", "[v6]:port" for an IPv6 address: for the console */
};

static struct node nodes[MAX_NODES];
static int n_nodes;
static const char *export_name;
/* The boot service (-s) and its path prefix; host empty: no refresh. */
static struct node server;
static char server_path[256];
static int nbd_index;
static int family_id, mcast_group;
static unsigned nl_seq;

/* The console, opened once at the start: after the initramfs switches to the real root,
 * this process's own root (the initramfs) has no /dev/console any more. */
static int console_fd = -1;

/* A line on the console (stderr when there is none). */
static void say(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(line, sizeof line, fmt, ap);
	va_end(ap);
	dprintf(console_fd >= 0 ? console_fd : 2, "streamboot: %s\n", line);
}

static double now_s(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int read_full(int fd, void *buf, size_t len)
{
	char *p = buf;
	while (len) {
		ssize_t n = read(fd, p, len);
		if (n <= 0)
			return -1;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static int write_full(int fd, const void *buf, size_t len)
{
	const char *p = buf;
	while (len) {
		ssize_t n = write(fd, p, len);
		if (n <= 0)
			return -1;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/* A TCP connection to host:port, or -1; connecting and each read and write are bounded
 * in time (timeout_s). */
static int dial_host(const char *host, const char *port, int timeout_s)
{
	/* Numeric first: a static binary in an initramfs has no name service to ask. */
	struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
				 .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV}, *ai, *a;
	if (getaddrinfo(host, port, &hints, &ai) != 0) {
		hints.ai_flags = AI_NUMERICSERV;
		if (getaddrinfo(host, port, &hints, &ai) != 0)
			return -1;
	}
	int fd = -1;
	for (a = ai; a; a = a->ai_next) {
		fd = socket(a->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
		if (fd < 0)
			continue;
		if (connect(fd, a->ai_addr, a->ai_addrlen) == 0 || errno == EINPROGRESS) {
			struct pollfd p = {.fd = fd, .events = POLLOUT};
			int err = 0;
			socklen_t el = sizeof err;
			if (poll(&p, 1, 2000) == 1 &&
			    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el) == 0 && err == 0)
				break;
		}
		close(fd);
		fd = -1;
	}
	freeaddrinfo(ai);
	if (fd < 0)
		return -1;
	fcntl(fd, F_SETFL, 0);
	struct timeval tv = {.tv_sec = timeout_s};
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
	int one = 1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
	return fd;
}

/* A connection to node i for the handshake. */
static int dial(int i)
{
	return dial_host(nodes[i].host, nodes[i].port, 5);
}

/* --- the node-list refresh from the boot service --- */

/* Fills a node from its host (len hl, an IPv6 address without brackets) and port. */
static void set_node(struct node *out, const char *host, size_t hl, unsigned port)
{
	memcpy(out->host, host, hl);
	out->host[hl] = 0;
	snprintf(out->port, sizeof out->port, "%u", port);
	int v6 = memchr(out->host, ':', hl) != NULL;
	snprintf(out->shown, sizeof out->shown, v6 ? "[%s]:%s" : "%s:%s", out->host, out->port);
}

/* Splits "HOST:PORT" or "[IPV6]:PORT" (len bytes of s) into a node; 0 when it is one the
 * helper can dial: a host name or IPv4 address ([A-Za-z0-9.-], not starting with '-' or
 * '.'), or an IPv6 address in brackets, and a port from 1 to 65535. Anything else from the
 * network is dropped. */
static int parse_node(const char *s, size_t len, struct node *out)
{
	const char *colon = memrchr(s, ':', len);
	if (!colon || colon == s || (size_t)(colon - s) >= sizeof out->host)
		return -1;
	size_t hl = (size_t)(colon - s), pl = len - hl - 1;
	if (pl < 1 || pl > 5)
		return -1;
	const char *host = s;
	if (s[0] == '[') {
		/* The brackets close right before the port's colon, around an address inet_pton
		 * takes (no zone: a link-local node would need the client's interface). */
		char v6[INET6_ADDRSTRLEN];
		struct in6_addr a;
		if (hl < 4 || s[hl - 1] != ']' || hl - 2 >= sizeof v6)
			return -1;
		memcpy(v6, s + 1, hl - 2);
		v6[hl - 2] = 0;
		if (inet_pton(AF_INET6, v6, &a) != 1)
			return -1;
		host = s + 1;
		hl -= 2;
	} else {
		if (!isalnum((unsigned char)s[0]))
			return -1;
		for (size_t k = 0; k < hl; k++)
			if (!isalnum((unsigned char)s[k]) && s[k] != '.' && s[k] != '-')
				return -1;
	}
	unsigned port = 0;
	for (size_t k = 0; k < pl; k++) {
		if (!isdigit((unsigned char)colon[1 + k]))
			return -1;
		port = port * 10 + (unsigned)(colon[1 + k] - '0');
	}
	if (port < 1 || port > 65535)
		return -1;
	set_node(out, host, hl, port);
	return 0;
}

static int same_node(const struct node *a, const struct node *b)
{
	return !strcmp(a->host, b->host) && !strcmp(a->port, b->port);
}

/* Takes -s's URL (http://HOST[:PORT][/PATH], HOST an IPv6 address in brackets too); 0 when
 * it is one. */
static int set_server(const char *url)
{
	if (strncmp(url, "http://", 7))
		return -1;
	const char *hp = url + 7, *slash = strchr(hp, '/');
	size_t hl = slash ? (size_t)(slash - hp) : strlen(hp);
	const char *path = slash ? slash : "";
	if (strlen(path) >= sizeof server_path || strchr(path, '?'))
		return -1;
	struct node n;
	char with_port[300];
	/* A port is given after the last colon, unless that colon is inside "[v6]". */
	if (memchr(hp, ':', hl) && hp[hl - 1] != ']')
		snprintf(with_port, sizeof with_port, "%.*s", (int)hl, hp);
	else
		snprintf(with_port, sizeof with_port, "%.*s:80", (int)hl, hp);
	if (hl == 0 || parse_node(with_port, strlen(with_port), &n))
		return -1;
	for (const char *c = path; *c; c++)
		if (!isalnum((unsigned char)*c) && !strchr("/._-~", *c))
			return -1;
	server = n;
	strcpy(server_path, path);
	size_t pl = strlen(server_path);
	if (pl && server_path[pl - 1] == '/')
		server_path[pl - 1] = 0;
	return 0;
}

/* The export name as a bearer token: only the characters a session token has. */
static int token_ok(void)
{
	size_t n = strlen(export_name);
	if (n < 16 || n > 128)
		return 0;
	for (size_t k = 0; k < n; k++)
		if (!isalnum((unsigned char)export_name[k]) && export_name[k] != '_' &&
		    export_name[k] != '-')
			return 0;
	return 1;
}

/* Asks the boot service for the live nodes and puts them first in the list (the known
 * ones it did not name after them, up to MAX_NODES). 1 when the list changed, 0 when not,
 * -1 (why in err) when there is no usable answer: the list is then left as it was. */
static int refresh_nodes(char *err, size_t errlen)
{
	if (!server.host[0] || !token_ok()) {
		snprintf(err, errlen, "no boot service to ask");
		return -1;
	}
	int fd = dial_host(server.host, server.port, 3);
	if (fd < 0) {
		snprintf(err, errlen, "the boot service %.90s does not answer", server.shown);
		return -1;
	}
	char req[768];
	int rl = snprintf(req, sizeof req,
			  "GET %s/failover-nodes HTTP/1.0\r\nHost: %s\r\n"
			  "Authorization: Bearer %s\r\nConnection: close\r\n\r\n",
			  server_path, server.shown, export_name);
	static char buf[MAX_ANSWER + 1];
	size_t got = 0;
	double deadline = now_s() + 3;
	int ok = rl > 0 && (size_t)rl < sizeof req && write_full(fd, req, (size_t)rl) == 0;
	while (ok && got < sizeof buf) {
		ssize_t n = read(fd, buf + got, sizeof buf - got);
		if (n == 0)
			break;
		if (n < 0 || now_s() > deadline)
			ok = 0;
		else
			got += (size_t)n;
	}
	close(fd);
	if (!ok) {
		snprintf(err, errlen, "no whole answer from the boot service");
		return -1;
	}
	if (got > MAX_ANSWER) {
		snprintf(err, errlen, "the boot service's answer is too long");
		return -1;
	}
	buf[got] = 0;
	if (memchr(buf, 0, got)) {
		snprintf(err, errlen, "the boot service's answer is not text");
		return -1;
	}
	int status = 0;
	if (sscanf(buf, "HTTP/1.%*1[01] %3d ", &status) != 1 || status != 200) {
		snprintf(err, errlen, "the boot service answered HTTP %d", status);
		return -1;
	}
	char *body = strstr(buf, "\r\n\r\n");
	body = body ? body + 4 : NULL;
	char *line = body ? strstr(body, "nbd_nodes=") : NULL;
	/* The key at a line's start, the line ended by its newline. */
	if (line && line != body && line[-1] != '\n')
		line = NULL;
	char *end = line ? strchr(line, '\n') : NULL;
	if (!end) {
		snprintf(err, errlen, "the boot service's answer has no nbd_nodes= line");
		return -1;
	}
	if (end > line && end[-1] == '\r')
		end--;
	struct node fresh[MAX_NODES];
	int n_fresh = 0;
	for (char *p = line + 10; p < end && n_fresh < MAX_NODES;) {
		char *comma = memchr(p, ',', (size_t)(end - p));
		char *stop = comma ? comma : end;
		struct node nd;
		int dup = 0;
		if (parse_node(p, (size_t)(stop - p), &nd) == 0) {
			for (int k = 0; k < n_fresh; k++)
				dup |= same_node(&fresh[k], &nd);
			if (!dup)
				fresh[n_fresh++] = nd;
		}
		p = stop + 1;
	}
	if (!n_fresh) {
		snprintf(err, errlen, "the boot service named no usable stream node");
		return -1;
	}
	for (int i = 0; i < n_nodes && n_fresh < MAX_NODES; i++) {
		int known = 0;
		for (int k = 0; k < n_fresh; k++)
			known |= same_node(&fresh[k], &nodes[i]);
		if (!known)
			fresh[n_fresh++] = nodes[i];
	}
	int changed = n_fresh != n_nodes;
	for (int i = 0; i < n_fresh && !changed; i++)
		changed = !same_node(&fresh[i], &nodes[i]);
	memcpy(nodes, fresh, sizeof fresh[0] * (size_t)n_fresh);
	n_nodes = n_fresh;
	return changed;
}

/* The fixed-newstyle handshake with NBD_OPT_GO for export_name: 0 with the export's size
 * and transmission flags, -1 (why in err) otherwise. */
static int handshake(int fd, uint64_t *size, uint16_t *flags, char *err, size_t errlen)
{
	uint64_t magic[2];
	uint16_t hflags;
	if (read_full(fd, magic, 16) || be64toh(magic[0]) != NBD_MAGIC ||
	    be64toh(magic[1]) != OPTS_MAGIC || read_full(fd, &hflags, 2)) {
		snprintf(err, errlen, "not a newstyle NBD server");
		return -1;
	}
	hflags = ntohs(hflags);
	if (!(hflags & FLAG_FIXED_NEWSTYLE)) {
		snprintf(err, errlen, "the server is not fixed-newstyle");
		return -1;
	}
	uint32_t cflags = htonl(FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES));
	uint32_t namelen = (uint32_t)strlen(export_name);
	struct __attribute__((packed)) {
		uint64_t magic;
		uint32_t opt, len, namelen;
	} head = {htobe64(OPTS_MAGIC), htonl(OPT_GO), htonl(4 + namelen + 2), htonl(namelen)};
	uint16_t no_info = 0;
	if (write_full(fd, &cflags, 4) || write_full(fd, &head, sizeof head) ||
	    write_full(fd, export_name, namelen) || write_full(fd, &no_info, 2)) {
		snprintf(err, errlen, "the connection broke during the handshake");
		return -1;
	}
	int have_export = 0;
	for (int replies = 0; replies < 64; replies++) {
		struct __attribute__((packed)) {
			uint64_t magic;
			uint32_t opt, type, len;
		} rep;
		if (read_full(fd, &rep, sizeof rep) || be64toh(rep.magic) != REPLY_MAGIC) {
			snprintf(err, errlen, "the connection broke during the handshake");
			return -1;
		}
		uint32_t type = ntohl(rep.type), len = ntohl(rep.len);
		char data[1024];
		if (len > sizeof data - 1 || read_full(fd, data, len)) {
			snprintf(err, errlen, "the server sent an oversized option reply");
			return -1;
		}
		data[len] = 0;
		if (type & 0x80000000u) {
			snprintf(err, errlen, "export refused (NBD error %#x%s%.160s)", type,
				 len ? ": " : "", len ? data : "");
			return -1;
		}
		if (type == REP_INFO && len >= 12 && ntohs(*(uint16_t *)data) == INFO_EXPORT) {
			uint64_t s;
			uint16_t f;
			memcpy(&s, data + 2, 8);
			memcpy(&f, data + 10, 2);
			*size = be64toh(s);
			*flags = ntohs(f);
			have_export = 1;
		} else if (type == REP_ACK) {
			if (!have_export)
				snprintf(err, errlen, "the server sent no export information");
			return have_export ? 0 : -1;
		}
	}
	snprintf(err, errlen, "the server sent too many option replies");
	return -1;
}

/* --- generic netlink, just what the nbd family needs --- */

struct msg {
	struct nlmsghdr nh;
	struct genlmsghdr gh;
	char attrs[512];
};

static struct nlattr *put(struct msg *m, int type, const void *data, size_t len)
{
	struct nlattr *a = (struct nlattr *)((char *)m + NLMSG_ALIGN(m->nh.nlmsg_len));
	a->nla_type = (uint16_t)type;
	a->nla_len = (uint16_t)(NLA_HDRLEN + len);
	if (len)
		memcpy((char *)a + NLA_HDRLEN, data, len);
	m->nh.nlmsg_len = NLMSG_ALIGN(m->nh.nlmsg_len) + NLA_ALIGN(a->nla_len);
	return a;
}

static void put_u32(struct msg *m, int type, uint32_t v) { put(m, type, &v, 4); }
static void put_u64(struct msg *m, int type, uint64_t v) { put(m, type, &v, 8); }

static void end_nest(struct msg *m, struct nlattr *a)
{
	a->nla_len = (uint16_t)((char *)m + m->nh.nlmsg_len - (char *)a);
}

static void start(struct msg *m, int family, int cmd)
{
	memset(m, 0, sizeof *m);
	m->nh.nlmsg_len = NLMSG_LENGTH(GENL_HDRLEN);
	m->nh.nlmsg_type = (uint16_t)family;
	m->nh.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
	m->nh.nlmsg_seq = ++nl_seq;
	m->gh.cmd = (uint8_t)cmd;
	m->gh.version = 1;
}

/* Sends m on fd and reads until its acknowledgement: 0, or the negative errno. */
static int transact(int fd, struct msg *m, char *reply, size_t replylen)
{
	if (send(fd, m, m->nh.nlmsg_len, 0) < 0)
		return -errno;
	char buf[8192];
	for (;;) {
		ssize_t n = recv(fd, buf, sizeof buf, 0);
		if (n < 0)
			return -errno;
		for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, (size_t)n);
		     h = NLMSG_NEXT(h, n)) {
			if (h->nlmsg_seq != m->nh.nlmsg_seq)
				continue;
			if (h->nlmsg_type == NLMSG_ERROR)
				return ((struct nlmsgerr *)NLMSG_DATA(h))->error;
			if (reply && h->nlmsg_len <= replylen)
				memcpy(reply, h, h->nlmsg_len);
		}
	}
}

/* The nbd family's id and its multicast group (where NBD_CMD_LINK_DEAD goes). */
static int resolve_family(int fd)
{
	struct msg m;
	start(&m, GENL_ID_CTRL, CTRL_CMD_GETFAMILY);
	put(&m, CTRL_ATTR_FAMILY_NAME, NBD_GENL_FAMILY_NAME, sizeof NBD_GENL_FAMILY_NAME);
	char reply[8192];
	int rc = transact(fd, &m, reply, sizeof reply);
	if (rc)
		return rc;
	struct nlmsghdr *h = (struct nlmsghdr *)reply;
	int left = (int)h->nlmsg_len - NLMSG_LENGTH(GENL_HDRLEN);
	struct nlattr *a = (struct nlattr *)((char *)NLMSG_DATA(h) + GENL_HDRLEN);
	for (; left >= NLA_HDRLEN && a->nla_len >= NLA_HDRLEN && a->nla_len <= left;
	     left -= NLA_ALIGN(a->nla_len), a = (struct nlattr *)((char *)a + NLA_ALIGN(a->nla_len))) {
		if (a->nla_type == CTRL_ATTR_FAMILY_ID)
			family_id = *(uint16_t *)((char *)a + NLA_HDRLEN);
		if ((a->nla_type & NLA_TYPE_MASK) != CTRL_ATTR_MCAST_GROUPS)
			continue;
		/* [group [name, id]]... */
		char *g = (char *)a + NLA_HDRLEN, *gend = (char *)a + a->nla_len;
		while (g + NLA_HDRLEN <= gend) {
			struct nlattr *grp = (struct nlattr *)g;
			char *p = g + NLA_HDRLEN, *pend = g + grp->nla_len;
			const char *name = NULL;
			int id = -1;
			while (p + NLA_HDRLEN <= pend) {
				struct nlattr *f = (struct nlattr *)p;
				if (f->nla_type == CTRL_ATTR_MCAST_GRP_NAME)
					name = p + NLA_HDRLEN;
				if (f->nla_type == CTRL_ATTR_MCAST_GRP_ID)
					id = *(int *)(p + NLA_HDRLEN);
				if (f->nla_len < NLA_HDRLEN)
					break;
				p += NLA_ALIGN(f->nla_len);
			}
			if (name && !strcmp(name, NBD_GENL_MCAST_GROUP_NAME))
				mcast_group = id;
			if (grp->nla_len < NLA_HDRLEN)
				break;
			g += NLA_ALIGN(grp->nla_len);
		}
	}
	return family_id ? 0 : -ENOENT;
}

static void put_socket(struct msg *m, int sock)
{
	struct nlattr *socks = put(m, NBD_ATTR_SOCKETS | NLA_F_NESTED, NULL, 0);
	struct nlattr *item = put(m, NBD_SOCK_ITEM | NLA_F_NESTED, NULL, 0);
	put_u32(m, NBD_SOCK_FD, (uint32_t)sock);
	end_nest(m, item);
	end_nest(m, socks);
}

static int genl_socket(void)
{
	int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC);
	struct sockaddr_nl sa = {.nl_family = AF_NETLINK};
	if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
		return -1;
	return fd;
}

/* Connects to the nodes in order from first (wrapping around) until one completes the
 * handshake; checks the export's size against want_size (0: any). Returns the socket and
 * sets *which, or -1 after one round, with the last node's answer in why (when given). */
static int attach_round(int first, uint64_t want_size, uint64_t *size, uint16_t *flags,
			int *which, int quiet, char *why, size_t whylen)
{
	for (int k = 0; k < n_nodes; k++) {
		int i = (first + k) % n_nodes;
		char err[256] = "no answer";
		int fd = dial(i);
		if (fd >= 0 && handshake(fd, size, flags, err, sizeof err) == 0) {
			if (!want_size || *size == want_size) {
				/* The kernel reads replies with the socket's own timeouts: the ones
				 * bounding the handshake would make an idle device's connection fail
				 * ("Receive control failed (result -11)") and the session detach. */
				struct timeval none = {0};
				setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &none, sizeof none);
				setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &none, sizeof none);
				*which = i;
				return fd;
			}
			snprintf(err, sizeof err, "the export's size changed");
		}
		if (fd >= 0)
			close(fd);
		if (!quiet)
			say("stream node %s: %s", nodes[i].shown, err);
		if (why)
			snprintf(why, whylen, "stream node %s: %s", nodes[i].shown, err);
	}
	return -1;
}

/* Moves node n to the end of the list, if it is in it. */
static void last_in_list(const struct node *n)
{
	for (int i = 0; i < n_nodes - 1; i++) {
		if (same_node(&nodes[i], n)) {
			struct node keep = nodes[i];
			memmove(&nodes[i], &nodes[i + 1], sizeof nodes[0] * (size_t)(n_nodes - 1 - i));
			nodes[n_nodes - 1] = keep;
			return;
		}
	}
}

/* The watcher: on each LINK_DEAD of our device, a socket to a live node goes in. */
static void watch(int ctl, int mc, int current, uint64_t size)
{
	for (;;) {
		char buf[8192];
		ssize_t n = recv(mc, buf, sizeof buf, 0);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == ENOBUFS) {
				/* Overrun: a LINK_DEAD may be lost. Reconfiguring a device with no
				 * dead connection changes nothing, so try it. */
				n = 0;
			} else {
				say("failover watcher: netlink: %s; failover is off", strerror(errno));
				return;
			}
		}
		int overrun = n == 0, dead = overrun;
		for (struct nlmsghdr *h = (struct nlmsghdr *)buf; n > 0 && NLMSG_OK(h, (size_t)n);
		     h = NLMSG_NEXT(h, n)) {
			struct genlmsghdr *g = NLMSG_DATA(h);
			if (h->nlmsg_type != family_id || g->cmd != NBD_CMD_LINK_DEAD)
				continue;
			struct nlattr *a = (struct nlattr *)((char *)g + GENL_HDRLEN);
			if (a->nla_type == NBD_ATTR_INDEX && *(uint32_t *)((char *)a + NLA_HDRLEN) ==
								     (uint32_t)nbd_index)
				dead = 1;
		}
		if (!dead)
			continue;
		if (!overrun)
			say("lost stream node %s; reconnecting (I/O is held meanwhile)",
			    nodes[current].shown);
		double since = now_s(), told = since, next_refresh = since;
		/* What the last round's nodes answered: said when it changes (a refusal's reason
		 * from the node, or no answer), so the console shows why a reattach fails. */
		char why[300] = "", said_why[300] = "";
		int waiting_said = 0, refresh_wait = 1, refresh_said = 0;
		/* The next node first: the dead one is most likely still dead. */
		int first = overrun ? current : (current + 1) % n_nodes;
		struct node lost = nodes[current];
		for (;;) {
			uint64_t s;
			uint16_t f;
			int which;
			int fd = attach_round(first, size, &s, &f, &which, 1, why, sizeof why);
			if (fd >= 0) {
				struct msg m;
				start(&m, family_id, NBD_CMD_RECONFIGURE);
				put_u32(&m, NBD_ATTR_INDEX, (uint32_t)nbd_index);
				put_socket(&m, fd);
				int rc = transact(ctl, &m, NULL, 0);
				close(fd);
				/* 0 also when no connection was dead (the kernel then drops ours). */
				if (rc == 0) {
					if (!overrun)
						say("reattached to stream node %s after %.1f s",
						    nodes[which].shown, now_s() - since);
					current = which;
					break;
				}
				say("the kernel refused the new connection: %s", strerror(-rc));
			}
			/* No node of the list answers: perhaps the live ones are others now. Asked
			 * again less and less often, so stranded clients do not flood the boot
			 * service. */
			if (server.host[0] && now_s() >= next_refresh) {
				char err[160];
				int changed = refresh_nodes(err, sizeof err);
				if (changed > 0) {
					say("the boot service names %d stream node(s); trying them", n_nodes);
					first = 0;
					last_in_list(&lost);
					refresh_said = 0;
					next_refresh = now_s() + refresh_wait;
					continue;
				}
				if (changed < 0 && !refresh_said) {
					say("cannot refresh the stream node list: %s", err);
					refresh_said = 1;
				}
				next_refresh = now_s() + refresh_wait;
				if (refresh_wait < REFRESH_MAX_WAIT_S)
					refresh_wait *= 2;
			}
			if (why[0] && strcmp(why, said_why)) {
				say("%s", why);
				strcpy(said_why, why);
			}
			if (!waiting_said || now_s() - told >= 30) {
				say("no live stream node answers (tried %d); waiting for one: the disk's "
				    "I/O is held, nothing is lost", n_nodes);
				waiting_said = 1;
				told = now_s();
			}
			usleep(500000);
		}
	}
}

static void usage(void)
{
	fprintf(stderr, "usage: streamboot-nbd [-d /dev/nbdN] [-t IO_TIMEOUT_S] [-w WAIT_S] [-r] "
			"[-f] [-s http://BOOT-SERVER[:PORT]] [-L] -N EXPORT HOST:PORT|[IPV6]:PORT ...\n");
	exit(2);
}

int main(int argc, char **argv)
{
	const char *dev = "/dev/nbd0";
	uint64_t io_timeout = 3, wait_s = 7 * 24 * 3600;
	int readonly = 0, foreground = 0, list_only = 0, c;
	const char *server_url = NULL;
	while ((c = getopt(argc, argv, "d:t:w:rfN:s:L")) != -1) {
		switch (c) {
		case 'd': dev = optarg; break;
		case 't': io_timeout = strtoull(optarg, NULL, 10); break;
		case 'w': wait_s = strtoull(optarg, NULL, 10); break;
		case 'r': readonly = 1; break;
		case 'f': foreground = 1; break;
		case 'N': export_name = optarg; break;
		case 's': server_url = optarg; break;
		case 'L': list_only = 1; break;
		default: usage();
		}
	}
	if (!export_name || optind >= argc || strlen(export_name) > 512)
		usage();
	if (sscanf(dev, "/dev/nbd%d", &nbd_index) != 1)
		usage();
	for (; optind < argc && n_nodes < MAX_NODES; optind++) {
		if (parse_node(argv[optind], strlen(argv[optind]), &nodes[n_nodes])) {
			fprintf(stderr, "streamboot-nbd: %.300s is not HOST:PORT or [IPV6]:PORT\n",
				argv[optind]);
			usage();
		}
		n_nodes++;
	}
	/* A boot service the helper cannot ask costs the refresh, never the attach. */
	if (server_url && set_server(server_url))
		fprintf(stderr, "streamboot-nbd: -s %.80s is not an http://HOST[:PORT] URL; the "
				"node list is not refreshed\n", server_url);
	if (list_only) {
		char err[160];
		int rc = refresh_nodes(err, sizeof err);
		if (rc < 0)
			fprintf(stderr, "streamboot-nbd: %s\n", err);
		printf("nodes:");
		for (int i = 0; i < n_nodes; i++)
			printf(" %s", nodes[i].shown);
		printf("\n");
		return rc < 0;
	}

	console_fd = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
	int ctl = genl_socket(), mc = genl_socket();
	if (ctl < 0 || mc < 0 || resolve_family(ctl) != 0 || mcast_group <= 0) {
		fprintf(stderr, "streamboot-nbd: the kernel's nbd netlink family is missing "
				"(modprobe nbd; Linux 4.12 or later)\n");
		return 1;
	}
	/* Listening before the connect: a link that dies at once is not missed. */
	if (setsockopt(mc, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &mcast_group, sizeof mcast_group)) {
		perror("streamboot-nbd: joining the nbd multicast group");
		return 1;
	}
	int rcvbuf = 1 << 20;
	setsockopt(mc, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);

	uint64_t size;
	uint16_t flags;
	int current;
	int fd = attach_round(0, 0, &size, &flags, &current, 0, NULL, 0);
	char why[160];
	if (fd < 0 && server.host[0] && refresh_nodes(why, sizeof why) > 0)
		fd = attach_round(0, 0, &size, &flags, &current, 0, NULL, 0);
	if (fd < 0) {
		fprintf(stderr, "streamboot-nbd: no stream node served export %.40s...\n", export_name);
		return 1;
	}
	struct msg m;
	start(&m, family_id, NBD_CMD_CONNECT);
	put_u32(&m, NBD_ATTR_INDEX, (uint32_t)nbd_index);
	put_u64(&m, NBD_ATTR_SIZE_BYTES, size);
	put_u64(&m, NBD_ATTR_BLOCK_SIZE_BYTES, 512);
	put_u64(&m, NBD_ATTR_SERVER_FLAGS, flags | (readonly ? 2 /* NBD_FLAG_READ_ONLY */ : 0));
	/* A request unanswered this long is sent again on the next connection: one that was
	 * in flight when its node died is otherwise only retried after a long block timeout. */
	put_u64(&m, NBD_ATTR_TIMEOUT, io_timeout);
	put_u64(&m, NBD_ATTR_DEAD_CONN_TIMEOUT, wait_s);
	put_socket(&m, fd);
	int rc = transact(ctl, &m, NULL, 0);
	close(fd);
	if (rc) {
		fprintf(stderr, "streamboot-nbd: NBD_CMD_CONNECT of %s: %s\n", dev, strerror(-rc));
		return 1;
	}
	printf("attached %s to %s (%llu bytes)\n", dev, nodes[current].shown,
	       (unsigned long long)size);
	fflush(stdout);
	if (!foreground) {
		pid_t pid = fork();
		if (pid < 0) {
			perror("streamboot-nbd: fork");
			return 1;
		}
		if (pid > 0)
			return 0;
		setsid();
		int null = open("/dev/null", O_RDWR);
		if (null >= 0) {
			dup2(null, 0);
			dup2(null, 1);
			dup2(null, 2);
		}
	}
	argv[0][0] = '@';
	if (chdir("/") != 0)
		return 1;
	mlockall(MCL_CURRENT | MCL_FUTURE);
	watch(ctl, mc, current, size);
	return 1;
}
