/* Barrier: a readers-writer barrier; I/O runs shared, snapshot lifecycle changes run
 * exclusive (waiting for I/O in flight and holding new I/O until they finish).
 * Exclusive waiters get priority over new shared holders.
 *
 * C threads take the shared side without the GIL.  Python callers (the engine's
 * lifecycle, the Python reference data path on the compiled engine) release the GIL
 * while they wait, because a C thread holding the shared side may need the GIL to call
 * back into Python before it lets go.  The mutex itself is never held while taking
 * the GIL.
 */
#include "datapath.h"

void barrier_acquire_shared(Barrier *b)
{
    pthread_mutex_lock(&b->mu);
    while (b->exclusive || b->waiting)
        pthread_cond_wait(&b->cv, &b->mu);
    b->shared++;
    pthread_mutex_unlock(&b->mu);
}

void barrier_release_shared(Barrier *b)
{
    pthread_mutex_lock(&b->mu);
    b->shared--;
    if (!b->shared && b->waiting)
        pthread_cond_broadcast(&b->cv);
    pthread_mutex_unlock(&b->mu);
}

static void acquire_exclusive(Barrier *b)
{
    pthread_mutex_lock(&b->mu);
    b->waiting++;
    while (b->exclusive || b->shared)
        pthread_cond_wait(&b->cv, &b->mu);
    b->waiting--;
    b->exclusive = 1;
    pthread_mutex_unlock(&b->mu);
}

static void release_exclusive(Barrier *b)
{
    pthread_mutex_lock(&b->mu);
    b->exclusive = 0;
    pthread_cond_broadcast(&b->cv);
    pthread_mutex_unlock(&b->mu);
}

static int Barrier_init(Barrier *b, PyObject *args, PyObject *kwds)
{
    if (!PyArg_ParseTuple(args, "") || (kwds && PyDict_Size(kwds))) {
        PyErr_SetString(PyExc_TypeError, "Barrier() takes no arguments");
        return -1;
    }
    pthread_mutex_init(&b->mu, NULL);
    pthread_cond_init(&b->cv, NULL);
    return 0;
}

static void Barrier_dealloc(Barrier *b)
{
    pthread_mutex_destroy(&b->mu);
    pthread_cond_destroy(&b->cv);
    Py_TYPE(b)->tp_free((PyObject *)b);
}

static PyObject *Barrier_acquire_shared(Barrier *b, PyObject *unused)
{
    (void)unused;
    Py_BEGIN_ALLOW_THREADS barrier_acquire_shared(b);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyObject *Barrier_release_shared(Barrier *b, PyObject *unused)
{
    (void)unused;
    barrier_release_shared(b);
    Py_RETURN_NONE;
}

static PyObject *Barrier_acquire_exclusive(Barrier *b, PyObject *unused)
{
    (void)unused;
    Py_BEGIN_ALLOW_THREADS acquire_exclusive(b);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyObject *Barrier_release_exclusive(Barrier *b, PyObject *unused)
{
    (void)unused;
    release_exclusive(b);
    Py_RETURN_NONE;
}

static PyMethodDef Barrier_methods[] = {
    {"acquire_shared", (PyCFunction)Barrier_acquire_shared, METH_NOARGS, NULL},
    {"release_shared", (PyCFunction)Barrier_release_shared, METH_NOARGS, NULL},
    {"acquire_exclusive", (PyCFunction)Barrier_acquire_exclusive, METH_NOARGS, NULL},
    {"release_exclusive", (PyCFunction)Barrier_release_exclusive, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

PyTypeObject BarrierType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "snapimg._datapath.Barrier",
    .tp_basicsize = sizeof(Barrier),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "I/O shared, lifecycle exclusive (see snapimg.engine.barrier).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Barrier_init,
    .tp_dealloc = (destructor)Barrier_dealloc,
    .tp_methods = Barrier_methods,
};
