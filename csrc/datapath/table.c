/* Table: the block table of one origin, readable by C code without the GIL.
 *
 * Same methods as snapimg.engine.table.BlockTable.  Writers are Python code holding
 * the engine's metadata lock (one writer at a time); readers are C threads of the
 * data path.  Chunk pointers are published with release stores and never freed
 * before the table; entries are 64-bit atomics, so a reader sees each entry either
 * before or after an update, and a copy's data is in the store before its entry.
 */
#include "datapath.h"

#include <stdlib.h>
#include <string.h>

static _Atomic uint64_t *chunk_of(Table *t, uint64_t ci)
{
    return atomic_load_explicit(&t->chunks[ci], memory_order_acquire);
}

uint64_t table_get(Table *t, uint64_t b)
{
    _Atomic uint64_t *c = chunk_of(t, b >> CHUNK_SHIFT);
    return c ? atomic_load_explicit(&c[b & (CHUNK - 1)], memory_order_acquire) : 0;
}

uint32_t table_snap_flags(Table *t, uint32_t gen)
{
    uint32_t flags = 0;
    pthread_mutex_lock(&t->snaps_mu);
    for (size_t i = 0; i < t->nsnaps; i++) {
        if (t->snaps[i].gen == gen) {
            flags = t->snaps[i].flags;
            break;
        }
    }
    pthread_mutex_unlock(&t->snaps_mu);
    return flags;
}

int table_overflow_in(Table *t, uint64_t b0, uint64_t b1)
{
    for (uint64_t ci = b0 >> CHUNK_SHIFT; ci <= (b1 - 1) >> CHUNK_SHIFT; ci++)
        if (atomic_load_explicit(&t->overflow[ci], memory_order_acquire))
            return 1;
    return 0;
}

static int check_block(Table *t, unsigned long long b, unsigned long long n)
{
    if (b > t->nblocks || n > t->nblocks - b) {
        PyErr_Format(PyExc_IndexError, "blocks [%llu, +%llu) beyond %llu", b, n,
                     (unsigned long long)t->nblocks);
        return -1;
    }
    return 0;
}

/* The chunk for writing (allocated on first use); NULL when out of memory. */
static _Atomic uint64_t *chunk_for_write(Table *t, uint64_t ci)
{
    _Atomic uint64_t *c = chunk_of(t, ci);
    if (!c) {
        c = calloc(CHUNK, sizeof(uint64_t));
        if (!c)
            return NULL;
        atomic_store_explicit(&t->chunks[ci], c, memory_order_release);
    }
    return c;
}

static void note_gen(Table *t, uint64_t ci, uint64_t entry)
{
    uint32_t g = (uint32_t)(entry >> GEN_SHIFT);
    if (g > t->chunk_max_gen[ci])
        t->chunk_max_gen[ci] = g;
}

static int Table_init(Table *t, PyObject *args, PyObject *kwds)
{
    static char *kw[] = {"nblocks", NULL};
    unsigned long long nblocks;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "K", kw, &nblocks))
        return -1;
    if (t->chunks) {
        PyErr_SetString(PyExc_RuntimeError, "Table initialised twice");
        return -1;
    }
    t->nblocks = nblocks;
    t->nchunks = (nblocks + CHUNK - 1) >> CHUNK_SHIFT;
    size_t n = t->nchunks ? t->nchunks : 1;
    t->chunks = calloc(n, sizeof(*t->chunks));
    t->chunk_max_gen = calloc(n, sizeof(uint32_t));
    t->overflow = calloc(n, sizeof(*t->overflow));
    if (!t->chunks || !t->chunk_max_gen || !t->overflow) {
        PyErr_NoMemory();
        return -1;
    }
    pthread_mutex_init(&t->snaps_mu, NULL);
    return 0;
}

static void Table_dealloc(Table *t)
{
    if (t->chunks) {
        for (uint64_t ci = 0; ci < t->nchunks; ci++)
            free((void *)t->chunks[ci]);
        pthread_mutex_destroy(&t->snaps_mu);
    }
    free(t->chunks);
    free(t->chunk_max_gen);
    free((void *)t->overflow);
    free(t->snaps);
    free(t->counts);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static PyObject *Table_get(Table *t, PyObject *arg)
{
    unsigned long long b = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred() || check_block(t, b, 1))
        return NULL;
    return PyLong_FromUnsignedLongLong(table_get(t, b));
}

static PyObject *Table_get_run(Table *t, PyObject *args)
{
    unsigned long long b, n;
    if (!PyArg_ParseTuple(args, "KK", &b, &n) || check_block(t, b, n))
        return NULL;
    PyObject *bytes = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * 8));
    if (!bytes)
        return NULL;
    uint64_t *out = (uint64_t *)PyBytes_AS_STRING(bytes);
    for (uint64_t i = 0; i < n; i++)
        out[i] = table_get(t, b + i);
    PyObject *arr = PyObject_CallFunction(ArrayType, "sO", "Q", bytes);
    Py_DECREF(bytes);
    return arr;
}

static PyObject *Table_set(Table *t, PyObject *args)
{
    unsigned long long b, entry;
    if (!PyArg_ParseTuple(args, "KK", &b, &entry) || check_block(t, b, 1))
        return NULL;
    uint64_t ci = b >> CHUNK_SHIFT;
    if (!entry && !chunk_of(t, ci))
        Py_RETURN_NONE;
    _Atomic uint64_t *c = chunk_for_write(t, ci);
    if (!c)
        return PyErr_NoMemory();
    atomic_store_explicit(&c[b & (CHUNK - 1)], entry, memory_order_release);
    note_gen(t, ci, entry);
    Py_RETURN_NONE;
}

/* The chunks of blocks [b, b+n) exist (allocated now if needed): 0, or -1 when out of
 * memory (then nothing may be installed there). */
int table_prepare_run(Table *t, uint64_t b, uint64_t n)
{
    for (uint64_t ci = b >> CHUNK_SHIFT; n && ci <= (b + n - 1) >> CHUNK_SHIFT; ci++)
        if (!chunk_for_write(t, ci))
            return -1;
    return 0;
}

/* Entries first, first+1, ... for blocks [b, b+n) (one writer at a time: Python under
 * the engine's lock and the core's log_mu, or C under log_mu). */
int table_set_run(Table *t, uint64_t b, uint64_t first, uint64_t n)
{
    while (n) {
        uint64_t ci = b >> CHUNK_SHIFT, off = b & (CHUNK - 1);
        uint64_t take = n < CHUNK - off ? n : CHUNK - off;
        _Atomic uint64_t *c = chunk_for_write(t, ci);
        if (!c)
            return -1;
        for (uint64_t i = 0; i < take; i++)
            atomic_store_explicit(&c[off + i], first + i, memory_order_release);
        note_gen(t, ci, first);
        b += take;
        n -= take;
        first += take;
    }
    return 0;
}

static PyObject *Table_set_run(Table *t, PyObject *args)
{
    unsigned long long b, first, n;
    if (!PyArg_ParseTuple(args, "KKK", &b, &first, &n) || check_block(t, b, n))
        return NULL;
    if (table_set_run(t, b, first, n))
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* fold() -> [(gen, blocks)]: what C installed for each live snapshot since the last
 * fold (then zero).  set_counts([(gen, preserved, limit or -1)]): the live snapshots as
 * Python knows them now.  Both with the core's log_mu held (Core.lock_log). */
static PyObject *Table_fold(Table *t, PyObject *unused)
{
    (void)unused;
    PyObject *out = PyList_New(0);
    for (size_t i = 0; out && i < t->ncounts; i++) {
        if (!t->counts[i].pending)
            continue;
        PyObject *item = Py_BuildValue("(kK)", (unsigned long)t->counts[i].gen,
                                       (unsigned long long)t->counts[i].pending);
        if (!item || PyList_Append(out, item)) {
            Py_XDECREF(item);
            Py_CLEAR(out);
            break;
        }
        Py_DECREF(item);
        t->counts[i].pending = 0;
    }
    return out;
}

static PyObject *Table_set_counts(Table *t, PyObject *arg)
{
    PyObject *seq = PySequence_Fast(arg, "counts must be a sequence");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    SnapCount *fresh = calloc((size_t)(n ? n : 1), sizeof(SnapCount));
    if (!fresh) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long gen;
        unsigned long long preserved;
        long long limit;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "kKL", &gen, &preserved,
                              &limit)) {
            free(fresh);
            Py_DECREF(seq);
            return NULL;
        }
        fresh[i].gen = (uint32_t)gen;
        fresh[i].base = preserved;
        fresh[i].limit = limit < 0 ? UINT64_MAX : (uint64_t)limit;
        for (size_t j = 0; j < t->ncounts; j++) /* (folded first: normally nothing) */
            if (t->counts[j].gen == fresh[i].gen)
                fresh[i].pending = t->counts[j].pending;
    }
    Py_DECREF(seq);
    free(t->counts);
    t->counts = fresh;
    t->ncounts = (size_t)n;
    Py_RETURN_NONE;
}

/* (block, entry) of every entry whose generation is >= lo, ascending (a list). */
static PyObject *Table_blocks_from_gen(Table *t, PyObject *arg)
{
    unsigned long lo = PyLong_AsUnsignedLong(arg);
    if (PyErr_Occurred())
        return NULL;
    uint64_t limit = (uint64_t)lo << GEN_SHIFT;
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    for (uint64_t ci = 0; ci < t->nchunks; ci++) {
        _Atomic uint64_t *c = chunk_of(t, ci);
        if (!c || t->chunk_max_gen[ci] < lo)
            continue;
        for (uint64_t i = 0; i < CHUNK; i++) {
            uint64_t e = atomic_load_explicit(&c[i], memory_order_relaxed);
            if (e < limit)
                continue;
            PyObject *item = Py_BuildValue("KK", (unsigned long long)((ci << CHUNK_SHIFT) + i),
                                           (unsigned long long)e);
            if (!item || PyList_Append(out, item)) {
                Py_XDECREF(item);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(item);
        }
    }
    return out;
}

/* (chunk number, array('Q') of its entries) of every allocated chunk, ascending. */
static PyObject *Table_chunk_items(Table *t, PyObject *unused)
{
    (void)unused;
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    for (uint64_t ci = 0; ci < t->nchunks; ci++) {
        _Atomic uint64_t *c = chunk_of(t, ci);
        if (!c)
            continue;
        PyObject *bytes = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(CHUNK * 8));
        if (!bytes)
            goto fail;
        uint64_t *dst = (uint64_t *)PyBytes_AS_STRING(bytes);
        for (uint64_t i = 0; i < CHUNK; i++)
            dst[i] = atomic_load_explicit(&c[i], memory_order_relaxed);
        PyObject *arr = PyObject_CallFunction(ArrayType, "sO", "Q", bytes);
        Py_DECREF(bytes);
        if (!arr)
            goto fail;
        PyObject *item = Py_BuildValue("KN", (unsigned long long)ci, arr);
        if (!item || PyList_Append(out, item)) {
            Py_XDECREF(item);
            goto fail;
        }
        Py_DECREF(item);
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

static PyObject *Table_nbytes(Table *t, PyObject *unused)
{
    (void)unused;
    uint64_t n = 0;
    for (uint64_t ci = 0; ci < t->nchunks; ci++)
        if (chunk_of(t, ci))
            n += CHUNK * 8;
    return PyLong_FromUnsignedLongLong(n);
}

static PyObject *Table_mark_overflow(Table *t, PyObject *args)
{
    unsigned long long b;
    int present;
    if (!PyArg_ParseTuple(args, "Kp", &b, &present) || check_block(t, b, 1))
        return NULL;
    _Atomic uint32_t *cnt = &t->overflow[b >> CHUNK_SHIFT];
    if (present)
        atomic_fetch_add_explicit(cnt, 1, memory_order_release);
    else if (atomic_load_explicit(cnt, memory_order_relaxed))
        atomic_fetch_sub_explicit(cnt, 1, memory_order_release);
    Py_RETURN_NONE;
}

static PyObject *Table_publish(Table *t, PyObject *args)
{
    unsigned long newest, excluding;
    PyObject *snaps;
    if (!PyArg_ParseTuple(args, "kkO", &newest, &excluding, &snaps))
        return NULL;
    PyObject *seq = PySequence_Fast(snaps, "snaps must be a sequence");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    SnapFlags *fresh = malloc(sizeof(SnapFlags) * (size_t)(n ? n : 1));
    if (!fresh) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long gen, flags;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "kk", &gen, &flags)) {
            free(fresh);
            Py_DECREF(seq);
            return NULL;
        }
        fresh[i].gen = (uint32_t)gen;
        fresh[i].flags = (uint32_t)flags;
    }
    Py_DECREF(seq);
    pthread_mutex_lock(&t->snaps_mu);
    SnapFlags *old = t->snaps;
    t->snaps = fresh;
    t->nsnaps = (size_t)n;
    atomic_store_explicit(&t->newest, (uint32_t)newest, memory_order_release);
    atomic_store_explicit(&t->excluding, (uint32_t)excluding, memory_order_release);
    pthread_mutex_unlock(&t->snaps_mu);
    free(old);
    Py_RETURN_NONE;
}

static PyMethodDef Table_methods[] = {
    {"get", (PyCFunction)Table_get, METH_O, "entry of block b"},
    {"get_run", (PyCFunction)Table_get_run, METH_VARARGS, "entries of blocks [b, b+n)"},
    {"set", (PyCFunction)Table_set, METH_VARARGS, "set the entry of block b"},
    {"set_run", (PyCFunction)Table_set_run, METH_VARARGS,
     "entries first, first+1, ... for blocks [b, b+n)"},
    {"blocks_from_gen", (PyCFunction)Table_blocks_from_gen, METH_O,
     "(block, entry) for entries of generation >= lo"},
    {"chunk_items", (PyCFunction)Table_chunk_items, METH_NOARGS,
     "(chunk number, entries) of allocated chunks"},
    {"nbytes", (PyCFunction)Table_nbytes, METH_NOARGS, "bytes of allocated chunks"},
    {"mark_overflow", (PyCFunction)Table_mark_overflow, METH_VARARGS,
     "block b has (or no longer has) older copies kept"},
    {"publish", (PyCFunction)Table_publish, METH_VARARGS,
     "publish(newest, excluding, [(gen, flags)]): the live view for C readers"},
    {"fold", (PyCFunction)Table_fold, METH_NOARGS,
     "[(gen, blocks)] installed by C since the last fold (core log lock held)"},
    {"set_counts", (PyCFunction)Table_set_counts, METH_O,
     "set_counts([(gen, preserved, limit or -1)]): live snapshots (core log lock held)"},
    {NULL, NULL, 0, NULL},
};

static PyObject *Table_get_nblocks(Table *t, void *unused)
{
    (void)unused;
    return PyLong_FromUnsignedLongLong(t->nblocks);
}

static PyGetSetDef Table_getset[] = {
    {"nblocks", (getter)Table_get_nblocks, NULL, "blocks of the origin", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "snapimg._datapath.Table",
    .tp_basicsize = sizeof(Table),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The block table of one origin (see snapimg.engine.table).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Table_init,
    .tp_dealloc = (destructor)Table_dealloc,
    .tp_methods = Table_methods,
    .tp_getset = Table_getset,
};
