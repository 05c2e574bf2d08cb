/* The NBD transmission phase of one plain (non-TLS) connection, in C.
 *
 * Names follow the NBD protocol spec (doc/proto.md).  Python negotiated the
 * connection (fixed newstyle handshake, options, structured replies, base:allocation)
 * and hands over the socket; this code receives requests, executes them on the
 * device and sends replies until NBD_CMD_DISC, a protocol violation or the peer
 * going away, with the GIL released.
 *
 * Threads (leader/followers, as snapimg/nbd/threaded.py): the worker holding the read
 * turn receives one request (many requests come in with one recv into the shared
 * input buffer; large payloads go straight into the worker's own buffer), passes the
 * turn on, executes the request itself and sends its reply under the output lock.
 * So a request never waits for a hand-off, several run at once, and replies go out of
 * order when one is slower than the next.  When nothing else has arrived (a client at
 * queue depth 1), the worker keeps the turn while it executes a quick request: waking
 * another worker only to have it wait for the next request would cost more than the
 * request; it passes the turn on before anything that may block (a large transfer, a
 * flush or FUA, a callback into Python).  Request checks and error values are those
 * of snapimg/nbd/requests.py.
 */
#define _GNU_SOURCE
#include "datapath.h"

#include <endian.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define NBD_REQUEST_MAGIC 0x25609513u
#define NBD_SIMPLE_REPLY_MAGIC 0x67446698u
#define NBD_STRUCTURED_REPLY_MAGIC 0x668e33efu

#define NBD_CMD_READ 0
#define NBD_CMD_WRITE 1
#define NBD_CMD_DISC 2
#define NBD_CMD_FLUSH 3
#define NBD_CMD_TRIM 4
#define NBD_CMD_WRITE_ZEROES 6
#define NBD_CMD_BLOCK_STATUS 7

#define NBD_CMD_FLAG_FUA (1u << 0)
#define NBD_CMD_FLAG_NO_HOLE (1u << 1)
#define NBD_CMD_FLAG_DF (1u << 2)
#define NBD_CMD_FLAG_REQ_ONE (1u << 3)

#define NBD_REPLY_FLAG_DONE (1u << 0)
#define NBD_REPLY_TYPE_NONE 0
#define NBD_REPLY_TYPE_OFFSET_DATA 1
#define NBD_REPLY_TYPE_BLOCK_STATUS 5
#define NBD_REPLY_TYPE_ERROR ((1u << 15) + 1)

#define NBD_EPERM 1
#define NBD_EIO 5
#define NBD_ENOMEM 12
#define NBD_EINVAL 22
#define NBD_ENOSPC 28
#define NBD_EOVERFLOW 75
#define NBD_ENOTSUP 95
#define NBD_ESHUTDOWN 108

#define MAX_PAYLOAD (32u << 20) /* as snapimg.nbd.protocol.MAX_PAYLOAD */
#define REQUEST_SIZE 28
#define INPUT_SIZE (256u << 10)
#define CONTEXT_ID 1 /* base:allocation, as snapimg.nbd.requests.CONTEXT_ID */
#define MAX_DESCRIPTORS 1024
#define KEEP_BUFFER (4u << 20) /* a worker's buffer above this is freed after use */

int nbd_error(int err)
{
    switch (err) {
    case EPERM:
    case EACCES:
    case EROFS:
        return NBD_EPERM;
    case ENOMEM:
        return NBD_ENOMEM;
    case EINVAL:
        return NBD_EINVAL;
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
        return NBD_ENOSPC;
    case EOVERFLOW:
        return NBD_EOVERFLOW;
    case ENOTSUP:
        return NBD_ENOTSUP;
    case ESHUTDOWN:
        return NBD_ESHUTDOWN;
    default:
        return NBD_EIO;
    }
}

typedef struct {
    uint16_t flags, type;
    uint64_t handle, offset;
    uint32_t length;
} Request;

typedef struct {
    Device *dev;
    int fd;
    int structured, base_allocation;
    PyObject *describe;
    pthread_mutex_t in_mu; /* the read turn */
    char *in;
    size_t in_start, in_end, in_cap;
    pthread_mutex_t out_mu;
    atomic_int done;
    char why[96]; /* why the connection ended, when the client broke the protocol */
} Conn;

typedef struct {
    Conn *conn;
    int holding; /* this worker has the read turn (in_mu) */
    OpCtx ctx;
    char *buf;
    size_t cap;
    pthread_t thread;
    char head[64 + 8 * 2 * MAX_DESCRIPTORS]; /* reply header / block status payload */
} Worker;

/* -- input --------------------------------------------------------------------------- */

/* Make n (<= in_cap) bytes available at in_start.  0, or -1 at the end. */
static int fill(Conn *c, size_t n)
{
    if (c->in_start + n > c->in_cap) {
        memmove(c->in, c->in + c->in_start, c->in_end - c->in_start);
        c->in_end -= c->in_start;
        c->in_start = 0;
    }
    while (c->in_end - c->in_start < n) {
        ssize_t got = recv(c->fd, c->in + c->in_end, c->in_cap - c->in_end, 0);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return -1;
        c->in_end += (size_t)got;
    }
    return 0;
}

/* Receive n bytes into dst (NULL: discard them).  0, or -1 at the end. */
static int receive(Conn *c, char *dst, size_t n)
{
    size_t have = c->in_end - c->in_start;
    size_t take = have < n ? have : n;
    if (dst)
        memcpy(dst, c->in + c->in_start, take);
    c->in_start += take;
    n -= take;
    if (dst)
        dst += take;
    while (n) {
        if (!dst) {
            if (fill(c, 1))
                return -1;
            size_t skip = c->in_end - c->in_start < n ? c->in_end - c->in_start : n;
            c->in_start += skip;
            n -= skip;
            continue;
        }
        ssize_t got = recv(c->fd, dst, n, MSG_WAITALL);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return -1;
        dst += got;
        n -= (size_t)got;
    }
    return 0;
}

static int reserve(Worker *w, size_t n)
{
    if (n <= w->cap)
        return 0;
    char *grown = realloc(w->buf, n);
    if (!grown)
        return -1;
    w->buf = grown;
    w->cap = n;
    return 0;
}

static void trim_buffer(Worker *w)
{
    if (w->cap > KEEP_BUFFER) {
        free(w->buf);
        w->buf = NULL;
        w->cap = 0;
    }
}

/* Big-endian fields at any alignment. */
static uint16_t get16(const char *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return be16toh(v);
}
static uint32_t get32(const char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return be32toh(v);
}
static uint64_t get64(const char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return be64toh(v);
}

enum { GOT_REQUEST, GOT_ERROR, GOT_END };

/* With the read turn: one request (a WRITE's payload into w->buf).  GOT_ERROR: the
 * request must be refused with *err (its payload was consumed). */
static int next_request(Conn *c, Worker *w, Request *r, int *err)
{
    if (fill(c, REQUEST_SIZE))
        return GOT_END;
    const char *p = c->in + c->in_start;
    uint32_t magic = get32(p);
    r->flags = get16(p + 4);
    r->type = get16(p + 6);
    memcpy(&r->handle, p + 8, 8); /* opaque: echoed as received */
    r->offset = get64(p + 16);
    r->length = get32(p + 24);
    c->in_start += REQUEST_SIZE;
    if (magic != NBD_REQUEST_MAGIC) {
        snprintf(c->why, sizeof(c->why), "bad request magic %#x: disconnecting", magic);
        return GOT_END;
    }
    if (r->type == NBD_CMD_DISC)
        return GOT_END;
    if (r->type != NBD_CMD_WRITE)
        return GOT_REQUEST;
    if (r->length > MAX_PAYLOAD || reserve(w, r->length)) {
        *err = r->length > MAX_PAYLOAD ? EINVAL : ENOMEM;
        return receive(c, NULL, r->length) ? GOT_END : GOT_ERROR;
    }
    return receive(c, w->buf, r->length) ? GOT_END : GOT_REQUEST;
}

/* -- output -------------------------------------------------------------------------- */

static void put16(char *p, uint16_t v)
{
    v = htobe16(v);
    memcpy(p, &v, 2);
}
static void put32(char *p, uint32_t v)
{
    v = htobe32(v);
    memcpy(p, &v, 4);
}
static void put64(char *p, uint64_t v)
{
    v = htobe64(v);
    memcpy(p, &v, 8);
}

/* A structured reply chunk header (20 bytes) at p. */
static size_t chunk(char *p, uint16_t flags, uint16_t type, uint64_t handle, uint32_t len)
{
    put32(p, NBD_STRUCTURED_REPLY_MAGIC);
    put16(p + 4, flags);
    put16(p + 6, type);
    memcpy(p + 8, &handle, 8);
    put32(p + 16, len);
    return 20;
}

static void send_reply(Conn *c, const char *head, size_t hlen, const char *data, size_t dlen)
{
    struct iovec iov[2] = {{(void *)head, hlen}, {(void *)data, dlen}};
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = dlen ? 2 : 1};
    pthread_mutex_lock(&c->out_mu);
    for (;;) {
        ssize_t n = sendmsg(c->fd, &msg, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) { /* the client is gone: stop reading too */
            atomic_store(&c->done, 1);
            shutdown(c->fd, SHUT_RDWR);
            break;
        }
        while (n > 0 && msg.msg_iovlen) {
            if ((size_t)n >= msg.msg_iov[0].iov_len) {
                n -= (ssize_t)msg.msg_iov[0].iov_len;
                msg.msg_iov++;
                msg.msg_iovlen--;
            } else {
                msg.msg_iov[0].iov_base = (char *)msg.msg_iov[0].iov_base + n;
                msg.msg_iov[0].iov_len -= (size_t)n;
                n = 0;
            }
        }
        if (!msg.msg_iovlen)
            break;
    }
    pthread_mutex_unlock(&c->out_mu);
}

static void reply_error(Conn *c, Worker *w, const Request *r, int err, const char *text)
{
    uint32_t value = (uint32_t)nbd_error(err);
    if (!c->structured) {
        put32(w->head, NBD_SIMPLE_REPLY_MAGIC);
        put32(w->head + 4, value);
        memcpy(w->head + 8, &r->handle, 8);
        send_reply(c, w->head, 16, NULL, 0);
        return;
    }
    size_t tlen = strlen(text);
    if (tlen > sizeof(w->head) - 26)
        tlen = sizeof(w->head) - 26;
    size_t n = chunk(w->head, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, r->handle,
                     (uint32_t)(6 + tlen));
    put32(w->head + n, value);
    put16(w->head + n + 4, (uint16_t)tlen);
    memcpy(w->head + n + 6, text, tlen);
    send_reply(c, w->head, n + 6 + tlen, NULL, 0);
}

static void reply_ok(Conn *c, Worker *w, const Request *r, const char *data, uint32_t dlen)
{
    size_t n;
    if (!c->structured) {
        put32(w->head, NBD_SIMPLE_REPLY_MAGIC);
        put32(w->head + 4, 0);
        memcpy(w->head + 8, &r->handle, 8);
        n = 16;
    } else if (dlen) {
        n = chunk(w->head, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, r->handle,
                  8 + dlen);
        put64(w->head + n, r->offset);
        n += 8;
    } else {
        n = chunk(w->head, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, r->handle, 0);
        data = NULL;
    }
    send_reply(c, w->head, n, data, dlen);
}

static void reply_extents(Conn *c, Worker *w, const Request *r, const CExtent *ext, size_t n)
{
    char *p = w->head + 24;
    size_t count = 0;
    uint64_t total = 0;
    uint32_t last_state = 0;
    for (size_t i = 0; i < n && total < r->length; i++) {
        uint64_t len = ext[i].length;
        if (len > r->length - total)
            len = r->length - total;
        if (!len)
            continue;
        if (count && last_state == ext[i].state) {
            put32(p - 8, (uint32_t)(get32(p - 8) + len));
        } else {
            if (count == MAX_DESCRIPTORS)
                break;
            put32(p, (uint32_t)len);
            put32(p + 4, ext[i].state);
            p += 8;
            count++;
            last_state = ext[i].state;
        }
        total += len;
    }
    if (!count) {
        reply_error(c, w, r, EIO, "device returned no extents");
        return;
    }
    if (r->flags & NBD_CMD_FLAG_REQ_ONE)
        count = 1;
    size_t plen = 4 + 8 * count;
    chunk(w->head, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, r->handle, (uint32_t)plen);
    put32(w->head + 20, CONTEXT_ID);
    send_reply(c, w->head, 20 + plen, NULL, 0);
}

/* -- requests ------------------------------------------------------------------------ */

static const uint16_t valid_flags[] = {
    [NBD_CMD_READ] = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF,
    [NBD_CMD_WRITE] = NBD_CMD_FLAG_FUA,
    [NBD_CMD_FLUSH] = NBD_CMD_FLAG_FUA,
    [NBD_CMD_TRIM] = NBD_CMD_FLAG_FUA,
    [NBD_CMD_WRITE_ZEROES] = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE,
    [NBD_CMD_BLOCK_STATUS] = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE,
};

/* The checks of snapimg.nbd.requests.check, in the same order: 0, or a refusal. */
static int check(Conn *c, const Request *r, char *msg, size_t mlen)
{
    Device *d = c->dev;
    int cmd = r->type;
    int known = cmd <= NBD_CMD_BLOCK_STATUS && cmd != NBD_CMD_DISC && cmd != 5;
    int write = cmd == NBD_CMD_WRITE || cmd == NBD_CMD_TRIM || cmd == NBD_CMD_WRITE_ZEROES;
    int ranged = write || cmd == NBD_CMD_READ || cmd == NBD_CMD_BLOCK_STATUS;
    if (!known) {
        snprintf(msg, mlen, "unsupported command %d", cmd);
        return EINVAL;
    }
    if ((r->flags & ~valid_flags[cmd]) || ((r->flags & NBD_CMD_FLAG_DF) && !c->structured)) {
        snprintf(msg, mlen, "bad flags %#x", r->flags);
        return EINVAL;
    }
    if (write && d->read_only) {
        snprintf(msg, mlen, "export is read-only");
        return EPERM;
    }
    if (ranged && (r->offset > d->o->size || r->length > d->o->size - r->offset)) {
        snprintf(msg, mlen, "request beyond the end of the export");
        return EINVAL;
    }
    if ((cmd == NBD_CMD_READ || cmd == NBD_CMD_WRITE) && r->length > MAX_PAYLOAD) {
        snprintf(msg, mlen, "payload over 32 MiB");
        return EINVAL;
    }
    if (cmd == NBD_CMD_TRIM && !d->can_trim) {
        snprintf(msg, mlen, "trim not supported on this export");
        return EINVAL;
    }
    if (cmd == NBD_CMD_BLOCK_STATUS && (!c->base_allocation || r->length == 0)) {
        snprintf(msg, mlen, "no metadata context negotiated or empty range");
        return EINVAL;
    }
    return 0;
}

static void execute(Conn *c, Worker *w, const Request *r)
{
    Device *d = c->dev;
    OpCtx *ctx = &w->ctx;
    char msg[96];
    int err = check(c, r, msg, sizeof(msg));
    if (err) {
        reply_error(c, w, r, err, msg);
        return;
    }
    ctx->err = 0;
    ctx->msg[0] = 0;
    int fua = (r->flags & NBD_CMD_FLAG_FUA) != 0, rc = 0;
    switch (r->type) {
    case NBD_CMD_READ:
        if (reserve(w, r->length ? r->length : 1)) {
            reply_error(c, w, r, ENOMEM, "out of memory");
            return;
        }
        if (r->length && dev_read(d, ctx, r->offset, r->length, w->buf))
            break;
        reply_ok(c, w, r, w->buf, r->length);
        return;
    case NBD_CMD_BLOCK_STATUS: {
        CExtent ext[MAX_DESCRIPTORS];
        size_t n;
        if (dev_block_status(d, ctx, r->offset, r->length, ext, MAX_DESCRIPTORS, &n))
            break;
        reply_extents(c, w, r, ext, n);
        return;
    }
    case NBD_CMD_WRITE:
        rc = dev_write(d, ctx, r->offset, r->length, w->buf, fua);
        break;
    case NBD_CMD_FLUSH:
        rc = dev_flush(d, ctx);
        break;
    case NBD_CMD_TRIM:
        if (r->length)
            rc = dev_trim(d, ctx, r->offset, r->length);
        if (!rc && fua)
            rc = dev_flush(d, ctx);
        break;
    case NBD_CMD_WRITE_ZEROES:
        if (r->length)
            rc = dev_zero(d, ctx, r->offset, r->length, fua,
                          !(r->flags & NBD_CMD_FLAG_NO_HOLE));
        break;
    }
    if (rc || ctx->err)
        reply_error(c, w, r, ctx->err ? ctx->err : EIO, ctx->msg);
    else
        reply_ok(c, w, r, NULL, 0);
}

/* Whether more input is waiting (already buffered, or on the socket: then it is
 * received now, without blocking). */
static int more_input(Conn *c)
{
    if (c->in_end > c->in_start)
        return 1;
    if (c->in_start == c->in_end)
        c->in_start = c->in_end = 0;
    ssize_t got = recv(c->fd, c->in + c->in_end, c->in_cap - c->in_end, MSG_DONTWAIT);
    if (got > 0) {
        c->in_end += (size_t)got;
        return 1;
    }
    return got == 0; /* EOF: let the next reader see it */
}

/* A request that may take long enough that others should be read meanwhile. */
static int may_be_slow(const Request *r)
{
    return r->type == NBD_CMD_FLUSH || (r->flags & NBD_CMD_FLAG_FUA) ||
           r->length > (256u << 10);
}

static void pass_turn(void *arg)
{
    Worker *w = arg;
    if (w->holding) {
        w->holding = 0;
        pthread_mutex_unlock(&w->conn->in_mu);
    }
}

static void *work(void *arg)
{
    Worker *w = arg;
    Conn *c = w->conn;
    for (;;) {
        Request r;
        int err = 0, got;
        if (!w->holding)
            pthread_mutex_lock(&c->in_mu);
        w->holding = 1;
        got = atomic_load(&c->done) ? GOT_END : next_request(c, w, &r, &err);
        if (got == GOT_END)
            atomic_store(&c->done, 1); /* the others see it when they get the turn */
        if (got == GOT_END || more_input(c) || may_be_slow(&r))
            pass_turn(w);
        if (got == GOT_END)
            break;
        w->ctx.on_block = pass_turn;
        w->ctx.on_block_arg = w;
        if (got == GOT_ERROR)
            reply_error(c, w, &r, err, err == EINVAL ? "payload over 32 MiB" : "out of memory");
        else
            execute(c, w, &r);
        w->ctx.on_block = NULL;
        trim_buffer(w);
    }
    if (w->ctx.own_ts) { /* a thread state made for this thread's callbacks */
        PyEval_RestoreThread(w->ctx.ts);
        PyGILState_Release(w->ctx.gstate);
    }
    return NULL;
}

PyObject *device_serve(Device *d, PyObject *args, PyObject *kwds)
{
    static char *kw[] = {"fd", "leftover", "structured", "base_allocation", "describe",
                         "threads", NULL};
    int fd, structured, base_allocation, nthreads;
    Py_buffer left;
    PyObject *describe;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iy*ppOi", kw, &fd, &left, &structured,
                                     &base_allocation, &describe, &nthreads))
        return NULL;
    if (nthreads < 1 || nthreads > 64) {
        PyBuffer_Release(&left);
        PyErr_SetString(PyExc_ValueError, "threads must be 1..64");
        return NULL;
    }
    Conn c = {.dev = d, .fd = fd, .structured = structured, .base_allocation = base_allocation,
              .describe = describe};
    c.in_cap = (size_t)left.len > INPUT_SIZE ? (size_t)left.len : INPUT_SIZE;
    c.in = malloc(c.in_cap);
    Worker *ws = calloc((size_t)nthreads, sizeof(Worker));
    if (!c.in || !ws) {
        free(c.in);
        free(ws);
        PyBuffer_Release(&left);
        return PyErr_NoMemory();
    }
    memcpy(c.in, left.buf, (size_t)left.len);
    c.in_end = (size_t)left.len;
    PyBuffer_Release(&left);
    pthread_mutex_init(&c.in_mu, NULL);
    pthread_mutex_init(&c.out_mu, NULL);
    for (int i = 0; i < nthreads; i++) {
        ws[i].conn = &c;
        ws[i].ctx.describe = describe;
    }
    Py_INCREF(d);
    Py_INCREF(describe);
    ws[0].ctx.ts = PyEval_SaveThread();
    int started = 1;
    for (int i = 1; i < nthreads; i++, started++)
        if (pthread_create(&ws[i].thread, NULL, work, &ws[i]))
            break;
    work(&ws[0]);
    for (int i = 1; i < started; i++)
        pthread_join(ws[i].thread, NULL);
    PyEval_RestoreThread(ws[0].ctx.ts);
    for (int i = 0; i < nthreads; i++)
        free(ws[i].buf);
    free(ws);
    free(c.in);
    pthread_mutex_destroy(&c.in_mu);
    pthread_mutex_destroy(&c.out_mu);
    Py_DECREF(describe);
    Py_DECREF(d);
    if (c.why[0])
        return PyUnicode_FromString(c.why);
    Py_RETURN_NONE;
}
