/* Device: an origin or a snapshot of the compiled data path.
 *
 * Each operation is decided in C where the outcome follows from the table alone:
 *   origin read/write/zero/trim/flush/block status; a write (or zero) first asks
 *   whether any of its blocks may need a copy for a live snapshot (its entry is older
 *   than the newest live generation) and only then calls back into Python, which
 *   plans, allocates slots, copies (Core.copy, in C without the GIL), enforces the
 *   snapshots' policies and records the copy in the store's log;
 *   snapshot read/block status of a valid snapshot without released or private blocks
 *   whose range has no older copies kept: from the store where preserved, else from
 *   the origin, looking again at origin-sourced blocks after reading them.
 * Everything else calls the Python reference data path (``slow``): snapshot writes,
 * releases, snapshots with exclusions, a store without files (RAM, fault injection).
 *
 * Operations run without the GIL; ctx->ts takes it back for callbacks.
 */
#define _GNU_SOURCE
#include "datapath.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FALLOC_PUNCH (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
#define STATUS_BLOCKS (UINT64_C(1) << 16) /* blocks one snapshot block status looks at */
#define MAX_ORIGIN_EXTENTS 64             /* as snapimg.engine.origin.Origin.extents */

/* -- errors and the GIL ------------------------------------------------------------- */

static int fail(OpCtx *ctx, int err, int cls, const char *fmt, ...)
{
    va_list ap;
    ctx->err = err;
    ctx->exc_class = cls;
    va_start(ap, fmt);
    vsnprintf(ctx->msg, sizeof(ctx->msg), fmt, ap);
    va_end(ap);
    return -1;
}

static int fail_errno(OpCtx *ctx, int err)
{
    return fail(ctx, err, EXC_OS, "%s", strerror(err));
}

static int fail_range(OpCtx *ctx, uint64_t off, uint64_t len, uint64_t size)
{
    return fail(ctx, EINVAL, EXC_RANGE, "request [%llu, +%llu) beyond device end %llu",
                (unsigned long long)off, (unsigned long long)len, (unsigned long long)size);
}

static int fail_closed(OpCtx *ctx)
{
    return fail(ctx, EIO, EXC_DEVICE, "the engine is closed");
}

void may_block(OpCtx *ctx)
{
    void (*fn)(void *) = ctx->on_block;
    if (fn) {
        ctx->on_block = NULL;
        fn(ctx->on_block_arg);
    }
}

static void gil_take(OpCtx *ctx)
{
    may_block(ctx);
    if (ctx->ts) {
        PyEval_RestoreThread(ctx->ts);
        ctx->ts = NULL;
    } else {
        ctx->gstate = PyGILState_Ensure();
        ctx->own_ts = 1;
    }
}

static void gil_drop(OpCtx *ctx)
{
    ctx->ts = PyEval_SaveThread();
}

/* With the GIL held after a failed Python call: keep the exception for a Python
 * caller, or turn it into an errno and message for an NBD reply. */
static int keep_exception(OpCtx *ctx)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (ctx->raise) {
        ctx->exc_type = type;
        ctx->exc_value = value;
        ctx->exc_tb = tb;
        ctx->err = EIO;
        return -1;
    }
    int err = EIO;
    const char *msg = "internal error";
    PyObject *got = ctx->describe && value
                        ? PyObject_CallFunctionObjArgs(ctx->describe, value, NULL)
                        : NULL;
    if (got && PyTuple_Check(got) && PyTuple_GET_SIZE(got) == 2) {
        err = (int)PyLong_AsLong(PyTuple_GET_ITEM(got, 0));
        const char *text = PyUnicode_AsUTF8(PyTuple_GET_ITEM(got, 1));
        if (text && err > 0)
            msg = text;
        else
            err = EIO;
    }
    PyErr_Clear();
    fail(ctx, err, EXC_DEVICE, "%s", msg);
    Py_XDECREF(got);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return -1;
}

/* Call slow.<name>(args...) with the GIL; returns a new reference, or NULL (ctx set).
 * The caller must take and drop the GIL around it. */
static PyObject *call_slow(Device *d, OpCtx *ctx, const char *name, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    PyObject *args = Py_VaBuildValue(fmt, ap);
    va_end(ap);
    PyObject *fn = args ? PyObject_GetAttrString(d->slow, name) : NULL;
    PyObject *res = fn ? PyObject_CallObject(fn, args) : NULL;
    Py_XDECREF(fn);
    Py_XDECREF(args);
    if (!res)
        keep_exception(ctx);
    return res;
}

/* A Python operation returning nothing. */
static int slow_op(Device *d, OpCtx *ctx, const char *name, const char *fmt, ...)
{
    va_list ap;
    gil_take(ctx);
    va_start(ap, fmt);
    PyObject *args = Py_VaBuildValue(fmt, ap);
    va_end(ap);
    PyObject *fn = args ? PyObject_GetAttrString(d->slow, name) : NULL;
    PyObject *res = fn ? PyObject_CallObject(fn, args) : NULL;
    Py_XDECREF(fn);
    Py_XDECREF(args);
    int rc = 0;
    if (!res)
        rc = keep_exception(ctx);
    Py_XDECREF(res);
    gil_drop(ctx);
    return rc;
}

/* -- file I/O ------------------------------------------------------------------------ */

/* len bytes at off; short (the file's end): zeroes (pad) or EIO. */
static int pread_all(int fd, char *buf, size_t len, uint64_t off, int pad)
{
    size_t got = 0;
    int err = file_pread(fd, buf, len, off, &got);
    if (err)
        return err;
    if (got < len) {
        if (!pad)
            return EIO;
        memset(buf + got, 0, len - got); /* store slots past the data file's end */
    }
    return 0;
}

static int write_zeroes_fd(COrigin *o, uint64_t off, uint64_t len, int punch)
{
    if (!o->is_block) {
        int mode = punch ? FALLOC_PUNCH : FALLOC_FL_ZERO_RANGE;
        if (fallocate(o->fd, mode, (off_t)off, (off_t)len) == 0)
            return 0;
        if (errno != EOPNOTSUPP && errno != ENOSYS && errno != EINVAL)
            return errno;
    }
    static const char zeros[1 << 16];
    while (len) {
        size_t n = len < sizeof(zeros) ? (size_t)len : sizeof(zeros);
        int err = file_pwrite(o->fd, zeros, n, off);
        if (err)
            return err;
        off += n;
        len -= n;
    }
    return 0;
}

/* The store's sync: in C where the store has files, else through Python. */
static int sync_store(Device *d, OpCtx *ctx)
{
    may_block(ctx);
    int err = core_sync_store_fds(d->core);
    if (err > 0)
        return fail(ctx, err, EXC_DEVICE, "preservation store I/O error: %s", strerror(err));
    if (err == 0)
        return 0;
    gil_take(ctx);
    PyObject *res = PyObject_CallNoArgs(d->core->sync_store);
    int rc = res ? 0 : keep_exception(ctx);
    Py_XDECREF(res);
    gil_drop(ctx);
    return rc;
}

/* -- origin -------------------------------------------------------------------------- */

static int check_range(Device *d, OpCtx *ctx, uint64_t off, uint64_t len)
{
    uint64_t size = d->o->size;
    if (off > size || len > size - off)
        return fail_range(ctx, off, len, size);
    return 0;
}

/* Whether any block of [b0, b1) may need a copy before it is overwritten. */
static int may_need_copy(Table *t, uint64_t b0, uint64_t b1)
{
    uint32_t newest = atomic_load_explicit(&t->newest, memory_order_acquire);
    if (!newest)
        return 0;
    uint64_t limit = (uint64_t)newest << GEN_SHIFT;
    for (uint64_t b = b0; b < b1; b++)
        if (table_get(t, b) < limit)
            return 1;
    return 0;
}

/* After C copied blocks [b, b+n) of generation gen into slots [slot, slot+n) but could
 * not record them (err 0: something changed meanwhile, or a limit is reached: Python
 * installs, or applies the policy; err: the copy or the log append failed: Python frees
 * the slots and applies the snapshots' policy). */
static int settle_copy(Device *d, OpCtx *ctx, uint64_t b, uint64_t n, uint32_t gen,
                       uint64_t slot, int err)
{
    atomic_fetch_add_explicit(&d->core->slow_installs, 1, memory_order_relaxed);
    gil_take(ctx);
    PyObject *res = call_slow(d, ctx, "settle_copy", "(KKIKi)", (unsigned long long)b,
                              (unsigned long long)n, gen, (unsigned long long)slot, err);
    Py_XDECREF(res);
    gil_drop(ctx);
    return res ? 0 : -1;
}

/* One run of never-copied blocks [b, b+n): slots, copy, and (under log_mu) the COPY
 * record, the table entries and the live snapshots' counts, exactly what Python's
 * DataPath._install records for such a run. */
static int fast_copy_run(Device *d, OpCtx *ctx, uint64_t b, uint64_t n, uint32_t gen)
{
    Core *c = d->core;
    COrigin *o = d->o;
    Table *t = o->table;
    uint64_t slot = slots_alloc(c->slots, n);
    core_grow_data(c);
    uint64_t ext[2] = {slot, n};
    int err = core_copy_blocks(c, o, b, ext, 1);
    if (err)
        return settle_copy(d, ctx, b, n, gen, slot, err);
    pthread_mutex_lock(&c->log_mu);
    int ok = atomic_load(&t->newest) == gen && !atomic_load(&t->excluding) &&
             !table_prepare_run(t, b, n);
    for (uint64_t i = 0; ok && i < n; i++)
        ok = !table_get(t, b + i); /* else another writer preserved it first */
    for (size_t i = 0; ok && i < t->ncounts; i++) {
        SnapCount *sc = &t->counts[i];
        ok = sc->limit == UINT64_MAX || sc->base + sc->pending + n <= sc->limit;
    }
    if (ok) {
        char rec[COPY_RECORD_SIZE];
        uint64_t seq;
        encode_copy_record(rec, o->id, gen, b, (uint32_t)n, slot);
        err = core_append(c, rec, sizeof(rec), &seq);
        if (!err) {
            table_set_run(t, b, ((uint64_t)gen << GEN_SHIFT) | (slot + 1), n); /* prepared */
            for (size_t i = 0; i < t->ncounts; i++)
                t->counts[i].pending += n;
            atomic_fetch_add_explicit(&c->fast_installs, 1, memory_order_relaxed);
        }
    }
    pthread_mutex_unlock(&c->log_mu);
    return ok && !err ? 0 : settle_copy(d, ctx, b, n, gen, slot, err);
}

/* The common case in C: a live snapshot, none with released or private blocks, and
 * blocks either never copied or already preserved for the newest snapshot.  1: Python
 * decides (older copies to keep, exclusions, strict durability, a copy timeout...). */
static int fast_preserve(Device *d, OpCtx *ctx, uint64_t b0, uint64_t b1)
{
    Table *t = d->o->table;
    if (!atomic_load(&d->core->fast_install))
        return 1;
    uint32_t gen = atomic_load(&t->newest);
    if (!gen || atomic_load(&t->excluding))
        return 1;
    uint64_t limit = (uint64_t)gen << GEN_SHIFT;
    for (uint64_t b = b0; b < b1;) {
        uint64_t e = table_get(t, b);
        if (e >= limit) { /* already preserved for the newest snapshot */
            b++;
            continue;
        }
        if (e)
            return 1;
        uint64_t n = 1;
        while (b + n < b1 && !table_get(t, b + n))
            n++;
        int rc = fast_copy_run(d, ctx, b, n, gen);
        if (rc)
            return rc;
        b += n;
    }
    return 0;
}

/* Barrier held: copy what live snapshots need of [off, +len) (Python decides, but for
 * the common case that C installs itself). */
static int preserve(Device *d, OpCtx *ctx, uint64_t off, uint64_t len)
{
    unsigned shift = d->core->block_shift;
    uint64_t b0 = off >> shift, b1 = ((off + len - 1) >> shift) + 1;
    if (!may_need_copy(d->o->table, b0, b1))
        return 0;
    int rc = fast_preserve(d, ctx, b0, b1);
    if (rc <= 0)
        return rc;
    gil_take(ctx);
    PyObject *res = call_slow(d, ctx, "preserve", "(KK)", (unsigned long long)b0,
                              (unsigned long long)b1);
    Py_XDECREF(res);
    gil_drop(ctx);
    return res ? 0 : -1;
}

/* After a write, outside the barrier: give freed store space back if the store
 * freed slots (as the reference does after every origin write). */
static void reclaim(Device *d, OpCtx *ctx)
{
    if (!atomic_exchange(&d->core->pending, 0))
        return;
    OpCtx quiet = *ctx; /* a failure here is the store's to report, not this request's */
    quiet.raise = 0;
    quiet.describe = NULL;
    slow_op(d, &quiet, "reclaim", "()");
    ctx->ts = quiet.ts;
    ctx->gstate = quiet.gstate;
    ctx->own_ts = quiet.own_ts;
}

/* An origin write (buf) or zeroing (buf NULL; punch: may leave a hole): the copies
 * live snapshots need first, then the change, then FUA's syncs; space the store freed
 * meanwhile is given back after the barrier. */
static int origin_change(Device *d, OpCtx *ctx, uint64_t off, uint64_t len, const char *buf,
                         int punch, int fua)
{
    if (check_range(d, ctx, off, len))
        return -1;
    if (!len)
        return 0;
    Core *c = d->core;
    int rc = 0, err;
    barrier_acquire_shared(c->barrier);
    if (atomic_load(&c->closed))
        rc = fail_closed(ctx);
    else if (preserve(d, ctx, off, len))
        rc = -1;
    else if ((err = buf ? file_pwrite(d->o->fd, buf, len, off)
                        : write_zeroes_fd(d->o, off, len, punch)))
        rc = fail_errno(ctx, err);
    else if (fua && !(rc = sync_store(d, ctx)) && fdatasync(d->o->fd))
        rc = fail_errno(ctx, errno);
    barrier_release_shared(c->barrier);
    reclaim(d, ctx);
    return rc;
}

static int origin_extents(COrigin *o, uint64_t off, uint64_t len, CExtent *out, size_t max,
                          size_t *n)
{
    uint64_t end = off + len < o->size ? off + len : o->size;
    *n = 0;
    if (o->is_block) {
        out[(*n)++] = (CExtent){end - off, 0};
        return 0;
    }
    uint64_t pos = off;
    size_t limit = max < MAX_ORIGIN_EXTENTS ? max : MAX_ORIGIN_EXTENTS;
    while (pos < end && *n < limit) {
        off_t data = lseek(o->fd, (off_t)pos, SEEK_DATA);
        uint64_t next;
        if (data < 0) {
            if (errno != ENXIO) {
                if (!*n)
                    out[(*n)++] = (CExtent){end - pos, 0};
                return 0;
            }
            data = (off_t)end;
        }
        if ((uint64_t)data > pos) {
            next = (uint64_t)data < end ? (uint64_t)data : end;
            out[(*n)++] = (CExtent){next - pos, 3}; /* NBD_STATE_HOLE | NBD_STATE_ZERO */
        } else {
            off_t hole = lseek(o->fd, (off_t)pos, SEEK_HOLE);
            if (hole < 0)
                hole = (off_t)end;
            next = (uint64_t)hole < end ? (uint64_t)hole : end;
            out[(*n)++] = (CExtent){next - pos, 0};
        }
        pos = next;
    }
    return 0;
}

/* -- snapshot ------------------------------------------------------------------------ */

/* Whether a snapshot read or block status of [b0, b1) can be decided in C now. */
static int snap_simple(Device *d, uint64_t b0, uint64_t b1)
{
    Core *c = d->core;
    Table *t = d->o->table;
    return atomic_load(&c->data_fd) >= 0 &&
           table_snap_flags(t, d->gen) == (SNAP_VALID | SNAP_SIMPLE) &&
           !table_overflow_in(t, b0, b1);
}

/* The slot snapshot gen reads block b from, or -1 for the origin. */
static int64_t snap_slot(Table *t, uint64_t b, uint64_t limit)
{
    uint64_t e = table_get(t, b);
    return e < limit ? -1 : (int64_t)(e & SLOT_MASK) - 1;
}

/* Barrier held, snap_simple: read [off, +len) into buf.  1: ask Python after all. */
static int snap_read_fast(Device *d, OpCtx *ctx, uint64_t off, uint32_t len, char *buf)
{
    Core *c = d->core;
    COrigin *o = d->o;
    Table *t = o->table;
    uint64_t bs = c->block_size, end = off + len, limit = (uint64_t)d->gen << GEN_SHIFT;
    int sfd = atomic_load(&c->data_fd), err;
    uint64_t b = off / bs, last = (end - 1) / bs;
    while (b <= last) {
        int64_t slot = snap_slot(t, b, limit);
        uint64_t n = 1;
        while (b + n <= last) { /* extend: origin runs, or consecutive slots */
            int64_t s = snap_slot(t, b + n, limit);
            if (slot < 0 ? s >= 0 : s != slot + (int64_t)n)
                break;
            n++;
        }
        uint64_t lo = b * bs > off ? b * bs : off, hi = (b + n) * bs < end ? (b + n) * bs : end;
        char *dst = buf + (lo - off);
        if (slot >= 0) {
            err = pread_all(sfd, dst, hi - lo, (uint64_t)slot * bs + (lo - b * bs), 1);
            if (err)
                return fail(ctx, err, EXC_DEVICE, "preservation store I/O error: %s",
                            strerror(err));
        } else {
            err = pread_all(o->fd, dst, hi - lo, lo, 0);
            if (err)
                return fail_errno(ctx, err);
            /* A copy installed while we read: the origin may hold newer data there. */
            for (uint64_t bb = b; bb < b + n; bb++) {
                int64_t s = snap_slot(t, bb, limit);
                if (s < 0)
                    continue;
                uint64_t blo = bb * bs > lo ? bb * bs : lo;
                uint64_t bhi = (bb + 1) * bs < hi ? (bb + 1) * bs : hi;
                err = pread_all(sfd, buf + (blo - off), bhi - blo,
                                (uint64_t)s * bs + (blo - bb * bs), 1);
                if (err)
                    return fail(ctx, err, EXC_DEVICE, "preservation store I/O error: %s",
                                strerror(err));
            }
        }
        b += n;
    }
    /* Invalidated, dropped or given exclusions while we read: the slots we read may
     * have been reused; Python answers (with the error, or the data). */
    return table_snap_flags(t, d->gen) == (SNAP_VALID | SNAP_SIMPLE) ? 0 : 1;
}

static int snap_read(Device *d, OpCtx *ctx, uint64_t off, uint32_t len, char *buf)
{
    if (check_range(d, ctx, off, len))
        return -1;
    if (!len)
        return 0;
    Core *c = d->core;
    unsigned shift = c->block_shift;
    uint64_t b0 = off >> shift, b1 = ((off + len - 1) >> shift) + 1;
    int rc = 1;
    barrier_acquire_shared(c->barrier);
    if (atomic_load(&c->closed))
        rc = fail_closed(ctx);
    else if (snap_simple(d, b0, b1))
        rc = snap_read_fast(d, ctx, off, len, buf);
    barrier_release_shared(c->barrier);
    if (rc <= 0)
        return rc;
    gil_take(ctx);
    PyObject *res = call_slow(d, ctx, "read", "(KI)", (unsigned long long)off, len);
    rc = res ? 0 : -1;
    if (res) {
        Py_buffer view;
        if (PyObject_GetBuffer(res, &view, PyBUF_SIMPLE) == 0) {
            if ((uint64_t)view.len == len)
                memcpy(buf, view.buf, len);
            else
                rc = fail(ctx, EIO, EXC_DEVICE, "short read");
            PyBuffer_Release(&view);
        } else {
            rc = keep_exception(ctx);
        }
        Py_DECREF(res);
    }
    gil_drop(ctx);
    return rc;
}

static void merge(CExtent *out, size_t *n, size_t max, uint64_t length, uint32_t state)
{
    if (*n && out[*n - 1].state == state)
        out[*n - 1].length += length;
    else if (length && *n < max)
        out[(*n)++] = (CExtent){length, state};
}

static int snap_block_status(Device *d, OpCtx *ctx, uint64_t off, uint64_t len, CExtent *out,
                             size_t max, size_t *n)
{
    *n = 0;
    if (check_range(d, ctx, off, len))
        return -1;
    Core *c = d->core;
    COrigin *o = d->o;
    uint64_t bs = c->block_size, end = off + len, b0 = off / bs;
    uint64_t b1 = len ? (end - 1) / bs + 1 : b0;
    if (b1 > b0 + STATUS_BLOCKS)
        b1 = b0 + STATUS_BLOCKS;
    int rc = 1;
    barrier_acquire_shared(c->barrier);
    if (atomic_load(&c->closed)) {
        rc = fail_closed(ctx);
    } else if (len && snap_simple(d, b0, b1)) {
        uint64_t limit = (uint64_t)d->gen << GEN_SHIFT;
        rc = 0;
        for (uint64_t b = b0; b < b1 && *n < max;) {
            int from_store = snap_slot(o->table, b, limit) >= 0;
            uint64_t nb = 1;
            while (b + nb < b1 && (snap_slot(o->table, b + nb, limit) >= 0) == from_store)
                nb++;
            uint64_t lo = b * bs > off ? b * bs : off;
            uint64_t hi = (b + nb) * bs < end ? (b + nb) * bs : end;
            if (from_store) {
                merge(out, n, max, hi - lo, 0);
            } else {
                size_t n_before = *n;
                uint64_t last_before = *n ? out[*n - 1].length : 0, pos = lo;
                while (pos < hi && *n < max) {
                    CExtent ext[MAX_ORIGIN_EXTENTS];
                    size_t got;
                    origin_extents(o, pos, hi - pos, ext, MAX_ORIGIN_EXTENTS, &got);
                    if (!got)
                        break;
                    for (size_t i = 0; i < got; i++) {
                        merge(out, n, max, ext[i].length, ext[i].state);
                        pos += ext[i].length;
                    }
                }
                /* A copy installed while we asked the origin: an origin write (a punched
                 * hole, zeroes) may already be what we saw there.  Data is always true. */
                for (uint64_t bb = b; bb < b + nb; bb++) {
                    if (snap_slot(o->table, bb, limit) >= 0) {
                        *n = n_before;
                        if (*n)
                            out[*n - 1].length = last_before;
                        merge(out, n, max, (pos < hi ? pos : hi) - lo, 0);
                        break;
                    }
                }
            }
            b += nb;
        }
    }
    barrier_release_shared(c->barrier);
    if (rc <= 0)
        return rc;
    gil_take(ctx);
    PyObject *res = call_slow(d, ctx, "block_status", "(KK)", (unsigned long long)off,
                              (unsigned long long)len);
    rc = res ? 0 : -1;
    PyObject *seq = res ? PySequence_Fast(res, "block_status must return a sequence") : NULL;
    if (res && !seq)
        rc = keep_exception(ctx);
    for (Py_ssize_t i = 0; seq && i < PySequence_Fast_GET_SIZE(seq) && *n < max; i++) {
        unsigned long long length;
        int hole, zero;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "Kpp", &length, &hole,
                              &zero)) {
            rc = keep_exception(ctx);
            break;
        }
        merge(out, n, max, length, (hole ? 1u : 0u) | (zero ? 2u : 0u));
    }
    Py_XDECREF(seq);
    Py_XDECREF(res);
    gil_drop(ctx);
    return rc;
}

/* -- operations ---------------------------------------------------------------------- */

int dev_read(Device *d, OpCtx *ctx, uint64_t off, uint32_t len, char *buf)
{
    if (d->kind == DEV_SNAPSHOT)
        return snap_read(d, ctx, off, len, buf);
    if (check_range(d, ctx, off, len))
        return -1;
    Core *c = d->core;
    int rc = 0, err;
    barrier_acquire_shared(c->barrier); /* the fd stays open while we read */
    if (atomic_load(&c->closed))
        rc = fail_closed(ctx);
    else if ((err = pread_all(d->o->fd, buf, len, off, 0)))
        rc = err == EIO ? fail(ctx, EIO, EXC_DEVICE, "short read") : fail_errno(ctx, err);
    barrier_release_shared(c->barrier);
    return rc;
}

int dev_write(Device *d, OpCtx *ctx, uint64_t off, uint32_t len, const char *buf, int fua)
{
    if (d->kind == DEV_ORIGIN)
        return origin_change(d, ctx, off, len, buf, 0, fua);
    gil_take(ctx);
    PyObject *view = PyMemoryView_FromMemory((char *)buf, len, PyBUF_READ);
    PyObject *res = view ? call_slow(d, ctx, "write", "(KOi)", (unsigned long long)off, view,
                                     fua)
                         : NULL;
    if (!view)
        keep_exception(ctx);
    if (view) { /* the buffer is the caller's: nothing may use it after this */
        PyObject *done = PyObject_CallMethod(view, "release", NULL);
        if (!done)
            PyErr_Clear();
        Py_XDECREF(done);
    }
    Py_XDECREF(view);
    Py_XDECREF(res);
    gil_drop(ctx);
    return res ? 0 : -1;
}

int dev_zero(Device *d, OpCtx *ctx, uint64_t off, uint64_t len, int fua, int punch)
{
    if (d->kind == DEV_ORIGIN)
        return origin_change(d, ctx, off, len, NULL, punch, fua);
    return slow_op(d, ctx, "zero", "(KKi)", (unsigned long long)off, (unsigned long long)len,
                   fua);
}

int dev_trim(Device *d, OpCtx *ctx, uint64_t off, uint64_t len)
{
    if (d->kind == DEV_SNAPSHOT)
        return slow_op(d, ctx, "trim", "(KK)", (unsigned long long)off, (unsigned long long)len);
    if (d->can_trim)
        return origin_change(d, ctx, off, len, NULL, 1, 0);
    return check_range(d, ctx, off, len);
}

int dev_flush(Device *d, OpCtx *ctx)
{
    Core *c = d->core;
    int rc = 0;
    barrier_acquire_shared(c->barrier);
    if (atomic_load(&c->closed))
        rc = fail_closed(ctx);
    else if (!(rc = sync_store(d, ctx)) && d->kind == DEV_ORIGIN && fdatasync(d->o->fd))
        rc = fail_errno(ctx, errno);
    barrier_release_shared(c->barrier);
    return rc;
}

int dev_block_status(Device *d, OpCtx *ctx, uint64_t off, uint64_t len, CExtent *out,
                     size_t max, size_t *n)
{
    if (d->kind == DEV_SNAPSHOT)
        return snap_block_status(d, ctx, off, len, out, max, n);
    *n = 0;
    if (check_range(d, ctx, off, len))
        return -1;
    Core *c = d->core;
    int rc = 0;
    barrier_acquire_shared(c->barrier);
    if (atomic_load(&c->closed))
        rc = fail_closed(ctx);
    else
        origin_extents(d->o, off, len, out, max, n);
    barrier_release_shared(c->barrier);
    return rc;
}

/* -- the Python type: BlockDevice methods for Python callers -------------------------- */

extern COrigin *core_origin(Core *c, Py_ssize_t idx); /* core.c */

PyObject *core_device(Core *c, PyObject *args, PyObject *kwds)
{
    static char *kw[] = {"origin", "slow", "gen", "read_only", "can_trim", NULL};
    Py_ssize_t idx;
    PyObject *slow;
    unsigned int gen = 0;
    int read_only = 0, can_trim = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "nO|$Ipp", kw, &idx, &slow, &gen, &read_only,
                                     &can_trim))
        return NULL;
    COrigin *o = core_origin(c, idx);
    if (!o)
        return NULL;
    Device *d = PyObject_New(Device, &DeviceType);
    if (!d)
        return NULL;
    Py_INCREF(c);
    d->core = c;
    d->o = o;
    d->kind = gen ? DEV_SNAPSHOT : DEV_ORIGIN;
    d->gen = gen;
    d->read_only = read_only;
    d->can_trim = can_trim;
    Py_INCREF(slow);
    d->slow = slow;
    return (PyObject *)d;
}

static void Device_dealloc(Device *d)
{
    Py_XDECREF(d->core);
    Py_XDECREF(d->slow);
    PyObject_Free(d);
}

/* After an operation for a Python caller (GIL held again): raise what ctx holds. */
static PyObject *raise_ctx(OpCtx *ctx)
{
    if (ctx->exc_type) {
        PyErr_Restore(ctx->exc_type, ctx->exc_value, ctx->exc_tb);
        return NULL;
    }
    PyObject *cls = ctx->exc_class == EXC_RANGE       ? ErrOutOfRange
                    : ctx->exc_class == EXC_READ_ONLY ? ErrReadOnly
                    : ctx->exc_class == EXC_DEVICE    ? ErrDevice
                                                      : NULL;
    if (cls)
        PyErr_SetString(cls, ctx->msg);
    else
        PyErr_SetObject(PyExc_OSError, Py_BuildValue("(is)", ctx->err, ctx->msg));
    return NULL;
}

#define RUN(ctx, call)                                                                      \
    do {                                                                                    \
        (ctx).raise = 1;                                                                    \
        (ctx).ts = PyEval_SaveThread();                                                     \
        rc = (call);                                                                        \
        PyEval_RestoreThread((ctx).ts);                                                     \
    } while (0)

/* Python callers may pass negative numbers: refused as the reference does. */
static int check_signed(Device *d, long long off, long long len, long long max)
{
    if (off < 0 || len < 0 || len > max) {
        PyErr_Format(ErrOutOfRange, "request [%lld, +%lld) beyond device end %llu", off, len,
                     (unsigned long long)d->o->size);
        return -1;
    }
    return 0;
}

static PyObject *Device_pread(Device *d, PyObject *args)
{
    long long off, len;
    if (!PyArg_ParseTuple(args, "LL", &off, &len) ||
        check_signed(d, off, len, (long long)(d->o->size < UINT32_MAX ? d->o->size : UINT32_MAX)))
        return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)len);
    if (!out)
        return NULL;
    OpCtx ctx = {0};
    int rc;
    RUN(ctx, dev_read(d, &ctx, (uint64_t)off, (uint32_t)len, PyBytes_AS_STRING(out)));
    if (rc) {
        Py_DECREF(out);
        return raise_ctx(&ctx);
    }
    return out;
}

static PyObject *Device_pwrite(Device *d, PyObject *args, PyObject *kwds)
{
    static char *kw[] = {"offset", "data", "fua", NULL};
    long long off;
    Py_buffer data;
    int fua = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Ly*|p", kw, &off, &data, &fua))
        return NULL;
    long long len = data.len;
    if (check_signed(d, off, len, UINT32_MAX)) {
        PyBuffer_Release(&data);
        return NULL;
    }
    OpCtx ctx = {0};
    int rc;
    RUN(ctx, dev_write(d, &ctx, (uint64_t)off, (uint32_t)len, data.buf, fua));
    PyBuffer_Release(&data);
    if (rc)
        return raise_ctx(&ctx);
    Py_RETURN_NONE;
}

static PyObject *Device_write_zeroes(Device *d, PyObject *args, PyObject *kwds)
{
    static char *kw[] = {"offset", "length", "fua", "may_trim", NULL};
    long long off, len;
    int fua = 0, may_trim = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "LL|pp", kw, &off, &len, &fua, &may_trim) ||
        check_signed(d, off, len, LLONG_MAX))
        return NULL;
    OpCtx ctx = {0};
    int rc;
    RUN(ctx, dev_zero(d, &ctx, (uint64_t)off, (uint64_t)len, fua, may_trim));
    if (rc)
        return raise_ctx(&ctx);
    Py_RETURN_NONE;
}

static PyObject *Device_trim(Device *d, PyObject *args)
{
    long long off, len;
    if (!PyArg_ParseTuple(args, "LL", &off, &len) || check_signed(d, off, len, LLONG_MAX))
        return NULL;
    OpCtx ctx = {0};
    int rc;
    RUN(ctx, dev_trim(d, &ctx, (uint64_t)off, (uint64_t)len));
    if (rc)
        return raise_ctx(&ctx);
    Py_RETURN_NONE;
}

static PyObject *Device_flush(Device *d, PyObject *unused)
{
    (void)unused;
    OpCtx ctx = {0};
    int rc;
    RUN(ctx, dev_flush(d, &ctx));
    if (rc)
        return raise_ctx(&ctx);
    Py_RETURN_NONE;
}

#define MAX_EXTENTS 1024

static PyObject *Device_block_status(Device *d, PyObject *args)
{
    long long off, len;
    if (!PyArg_ParseTuple(args, "LL", &off, &len) || check_signed(d, off, len, LLONG_MAX))
        return NULL;
    CExtent *ext = malloc(sizeof(CExtent) * MAX_EXTENTS);
    if (!ext)
        return PyErr_NoMemory();
    size_t n = 0;
    OpCtx ctx = {0};
    int rc;
    RUN(ctx, dev_block_status(d, &ctx, (uint64_t)off, (uint64_t)len, ext, MAX_EXTENTS, &n));
    if (rc) {
        free(ext);
        return raise_ctx(&ctx);
    }
    PyObject *out = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; out && i < n; i++) {
        PyObject *item = PyObject_CallFunction(ExtentType, "KOO",
                                               (unsigned long long)ext[i].length,
                                               ext[i].state & 1 ? Py_True : Py_False,
                                               ext[i].state & 2 ? Py_True : Py_False);
        if (!item) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, item);
    }
    free(ext);
    return out;
}

static PyMethodDef Device_methods[] = {
    {"pread", (PyCFunction)Device_pread, METH_VARARGS, "pread(offset, length) -> bytes"},
    {"pwrite", (PyCFunction)(void (*)(void))Device_pwrite, METH_VARARGS | METH_KEYWORDS,
     "pwrite(offset, data, fua=False)"},
    {"write_zeroes", (PyCFunction)(void (*)(void))Device_write_zeroes,
     METH_VARARGS | METH_KEYWORDS, "write_zeroes(offset, length, fua=False, may_trim=False)"},
    {"trim", (PyCFunction)Device_trim, METH_VARARGS, "trim(offset, length)"},
    {"flush", (PyCFunction)Device_flush, METH_NOARGS, "flush()"},
    {"block_status", (PyCFunction)Device_block_status, METH_VARARGS,
     "block_status(offset, length) -> [Extent]"},
    {"serve", (PyCFunction)(void (*)(void))device_serve, METH_VARARGS | METH_KEYWORDS,
     "serve(fd, leftover, structured, base_allocation, describe, threads): the NBD "
     "transmission phase of one plain connection, until it ends (GIL released)"},
    {NULL, NULL, 0, NULL},
};

PyTypeObject DeviceType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "snapimg._datapath.Device",
    .tp_basicsize = sizeof(Device),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An origin or snapshot of the compiled data path.",
    .tp_dealloc = (destructor)Device_dealloc,
    .tp_methods = Device_methods,
};
