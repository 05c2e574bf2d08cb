/* Slots: slot allocation in the store's data area, shared by Python and C.
 *
 * The same allocator as snapimg/engine/slots.py (the reference): every request gets n
 * consecutive slots from the smallest freed run that holds them all (the lowest such
 * run among equals: best fit by (count, start)), else at the end of the area; freed
 * runs merge with their neighbours, and runs that reach the end shrink the area.
 * Python (the engine's bookkeeping) and C (a first copy installed without the GIL)
 * allocate from it; a mutex makes each call atomic.
 */
#include "datapath.h"

#include <stdlib.h>
#include <string.h>

/* memmove of n runs (n may be 0 where the array is still NULL) */
static void move_runs(SlotRun *dst, SlotRun *src, size_t n)
{
    if (n)
        memmove(dst, src, n * sizeof(*dst));
}

/* Free runs [start, end), sorted by start, merged (never touching). */
static size_t find_first_end_ge(Slots *s, uint64_t x) /* bisect_left(ends, x) */
{
    size_t lo = 0, hi = s->nruns;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (s->runs[mid].end < x)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static size_t find_first_start_gt(Slots *s, uint64_t x) /* bisect_right(starts, x) */
{
    size_t lo = 0, hi = s->nruns;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (s->runs[mid].start <= x)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

uint64_t slots_alloc(Slots *s, uint64_t n)
{
    pthread_mutex_lock(&s->mu);
    size_t best = s->nruns;
    for (size_t i = 0; i < s->nruns; i++) {
        uint64_t count = s->runs[i].end - s->runs[i].start;
        if (count < n)
            continue;
        if (best == s->nruns) {
            best = i;
            continue;
        }
        uint64_t bc = s->runs[best].end - s->runs[best].start;
        if (count < bc) /* ties: the lower start, which comes first */
            best = i;
    }
    uint64_t start;
    if (best == s->nruns) {
        start = s->end;
        s->end += n;
    } else {
        start = s->runs[best].start;
        s->runs[best].start += n;
        if (s->runs[best].start == s->runs[best].end) {
            move_runs(&s->runs[best], &s->runs[best + 1], s->nruns - best - 1);
            s->nruns--;
        }
    }
    pthread_mutex_unlock(&s->mu);
    return start;
}

int slots_free(Slots *s, uint64_t start, uint64_t count)
{
    uint64_t end = start + count;
    int rc = 0;
    pthread_mutex_lock(&s->mu);
    size_t i = find_first_end_ge(s, start), j = find_first_start_gt(s, end);
    if (i < j) {
        if (s->runs[i].start < start)
            start = s->runs[i].start;
        if (s->runs[j - 1].end > end)
            end = s->runs[j - 1].end;
    }
    if (end == s->end) { /* reaches the end: the area shrinks instead */
        move_runs(&s->runs[i], &s->runs[j], s->nruns - j);
        s->nruns -= j - i;
        s->end = start;
    } else if (i < j) { /* replaces the runs [i, j) */
        s->runs[i].start = start;
        s->runs[i].end = end;
        move_runs(&s->runs[i + 1], &s->runs[j], s->nruns - j);
        s->nruns -= j - i - 1;
    } else { /* a new run at i */
        if (s->nruns == s->capruns) {
            size_t cap = s->capruns ? 2 * s->capruns : 16;
            void *grown = realloc(s->runs, cap * sizeof(*s->runs));
            if (!grown) {
                rc = -1;
                goto out;
            }
            s->runs = grown;
            s->capruns = cap;
        }
        move_runs(&s->runs[i + 1], &s->runs[i], s->nruns - i);
        s->runs[i].start = start;
        s->runs[i].end = end;
        s->nruns++;
    }
out:
    pthread_mutex_unlock(&s->mu);
    return rc;
}

/* -- the Python type: the methods of snapimg.engine.slots.SlotAllocator ------------------ */

static int Slots_init(Slots *s, PyObject *args, PyObject *kwds)
{
    static char *kw[] = {"end", NULL};
    unsigned long long end = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|K", kw, &end))
        return -1;
    if (s->initialised) {
        PyErr_SetString(PyExc_RuntimeError, "Slots initialised twice");
        return -1;
    }
    pthread_mutex_init(&s->mu, NULL);
    s->initialised = 1;
    s->end = end;
    return 0;
}

static void Slots_dealloc(Slots *s)
{
    if (s->initialised)
        pthread_mutex_destroy(&s->mu);
    free(s->runs);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyObject *Slots_alloc(Slots *s, PyObject *arg)
{
    unsigned long long n = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    if (!n) {
        PyErr_SetString(PyExc_ValueError, "alloc(0)");
        return NULL;
    }
    uint64_t start = slots_alloc(s, n);
    return Py_BuildValue("[(KK)]", (unsigned long long)start, n);
}

static PyObject *Slots_free(Slots *s, PyObject *args)
{
    unsigned long long start, count = 1;
    if (!PyArg_ParseTuple(args, "K|K", &start, &count))
        return NULL;
    if (count && slots_free(s, start, count))
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *Slots_runs(Slots *s, PyObject *unused)
{
    (void)unused;
    pthread_mutex_lock(&s->mu);
    PyObject *out = PyList_New((Py_ssize_t)s->nruns);
    for (size_t i = 0; out && i < s->nruns; i++) {
        PyObject *item = Py_BuildValue("(KK)", (unsigned long long)s->runs[i].start,
                                       (unsigned long long)(s->runs[i].end - s->runs[i].start));
        if (!item) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, item);
    }
    pthread_mutex_unlock(&s->mu);
    return out;
}

static PyObject *Slots_get_end(Slots *s, void *unused)
{
    (void)unused;
    pthread_mutex_lock(&s->mu);
    uint64_t end = s->end;
    pthread_mutex_unlock(&s->mu);
    return PyLong_FromUnsignedLongLong(end);
}

static int Slots_set_end(Slots *s, PyObject *value, void *unused)
{
    (void)unused;
    unsigned long long end = value ? PyLong_AsUnsignedLongLong(value) : 0;
    if (!value || PyErr_Occurred()) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "end cannot be deleted");
        return -1;
    }
    pthread_mutex_lock(&s->mu);
    s->end = end;
    pthread_mutex_unlock(&s->mu);
    return 0;
}

static PyObject *Slots_get_free_count(Slots *s, void *unused)
{
    (void)unused;
    uint64_t n = 0;
    pthread_mutex_lock(&s->mu);
    for (size_t i = 0; i < s->nruns; i++)
        n += s->runs[i].end - s->runs[i].start;
    pthread_mutex_unlock(&s->mu);
    return PyLong_FromUnsignedLongLong(n);
}

static PyMethodDef Slots_methods[] = {
    {"alloc", (PyCFunction)Slots_alloc, METH_O, "n consecutive slots: [(first, n)]"},
    {"free", (PyCFunction)Slots_free, METH_VARARGS, "free(start, count=1)"},
    {"runs", (PyCFunction)Slots_runs, METH_NOARGS, "the free runs: [(first, count)]"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Slots_getset[] = {
    {"end", (getter)Slots_get_end, (setter)Slots_set_end, "slots [0, end) exist", NULL},
    {"free_count", (getter)Slots_get_free_count, NULL, "freed slots below the end", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject SlotsType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "snapimg._datapath.Slots",
    .tp_basicsize = sizeof(Slots),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Slot allocation (see snapimg.engine.slots.SlotAllocator).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Slots_init,
    .tp_dealloc = (destructor)Slots_dealloc,
    .tp_methods = Slots_methods,
    .tp_getset = Slots_getset,
};
